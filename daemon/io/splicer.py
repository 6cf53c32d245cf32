"""The splice relay's I/O glue: API ops, the spliced flow table, actions carried out.

The rules of a splice live in daemon/splice/relay.py (sans-I/O, one
``Relay`` per splice).  This module is what the daemon needs around it:

* the API ops of thesis 4.1 (``intend_splice``, the server side's
  ``connect``, ``splice``), checking what the proxy asked against the state
  of its connections;
* the *spliced flow table*: after ``splice()`` both connections' 4-tuples
  map to the splice and the interface, so the daemon's TUN input hands their
  segments to the relay without building any object;
* carrying out the relay's actions: writes to the TUN, a draining TCB's
  segments and timer, the TIMEWAIT timer, the teardown, and the fast path
  (daemon/fastpath) when it runs.

A ``Splice`` is the glue of one relay: the daemon's two ``Conn`` objects
(they own the proxy's socketpair ends and the API ids) and the timers.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import ipaddress
import logging
import selectors
import socket
import struct
import termios
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Protocol

from daemon.api.core import TAP_SOCK, ApiError, Done, Result
from daemon.api.protocol import LOCAL_AT_LEN, Address, ErrorCode, Inline
from daemon.fastpath.adopt import InheritedSplice, adoptable
from daemon.fastpath.layout import STATE_OF_CODE, SpliceXlate, reverse_key
from daemon.io.repair import bind_port
from daemon.io.timers import Timer
from daemon.splice.relay import (
    Action,
    ArmTimer,
    ArmTimewait,
    Emit,
    HandBack,
    InstallFastPath,
    ProxyMisuse,
    Relay,
    RelayCounters,
    Reopen,
    TapData,
    TapEnd,
    TearDown,
    WatchFinAck,
    Write,
)
from daemon.splice.state import Iface, SpliceState
from daemon.splice.translator import Translator
from daemon.tcp.state import TcpState
from daemon.wire.icmp import Unreachable
from daemon.wire.ipv6 import Ipv6Packet
from daemon.wire.vnet import VnetHeader

if TYPE_CHECKING:
    from daemon.io.daemon import Conn, Daemon
    from daemon.tcp.connection import TcpConnection

log = logging.getLogger("daemon.splice")

CLIENT, SERVER = Iface.CLIENT, Iface.SERVER
# The Fig. 5.1 states a map entry can carry over a restart (daemon/fastpath/adopt.py).
_ADOPTABLE = frozenset(
    {SpliceState.SPLICED, SpliceState.FIN_RELAYED, SpliceState.SHUTDOWN, SpliceState.TIMEWAIT}
)
# The flow table's value for a dormant splice's 4-tuples: no Splice object at
# all, one shared tuple per interface (``Splicer._sleep``).
_DORMANT: dict[Iface, tuple[None, Iface]] = {CLIENT: (None, CLIENT), SERVER: (None, SERVER)}
_DORMANT_CLIENT = _DORMANT[CLIENT]

# The daemon's flow key: local address, local port, remote address, remote port.
LocalKey = tuple[bytes, int, bytes, int]
# Relay keys (and the fast path's) are of *arriving* segments: remote first.
RelayKey = tuple[bytes, int, bytes, int]


class FastPathPort(Protocol):
    """What the splicer needs of daemon.fastpath.FastPath (a fake in tests)."""

    def install(
        self,
        key: RelayKey,
        t: Translator,
        egress_ifindex: int,
        limit: int | None = None,
        fin_ack: int | None = None,
        side: Iface = Iface.CLIENT,
        state: SpliceState = SpliceState.SPLICED,
        out: tuple[bytes, bytes] | None = None,
        punt_ifindex: int = 0,
    ) -> None: ...

    def hold(self, key: RelayKey, punt_ifindex: int) -> None: ...

    def watch_fin_ack(
        self, key: RelayKey, fin_ack: int | None, state: SpliceState | None = None
    ) -> None: ...

    def remove(self, key: RelayKey) -> tuple[int, int]: ...

    def counters(self, key: RelayKey) -> tuple[int, int]: ...

    def entry(self, key: RelayKey) -> SpliceXlate | None: ...

    def add_counters(self, key: RelayKey, packets: int, nbytes: int) -> None: ...


# A woken splice goes back to sleep after this long without a punted segment.
NAP_AFTER = 1.0
# A splice that just became compact sleeps only after this long without a
# punted segment: most connections end (FINs, punted) within it, and a sleep
# and a wake cost four map syscalls and a relay rebuilt per connection.
FIRST_NAP_AFTER = 0.5
# Tap bytes the daemon keeps for a reader that is behind, beyond what the
# socket itself holds; past this the tap overflows (docs/api.md).
TAP_BACKLOG = 4 << 20


@dataclass(slots=True, eq=False)
class TapPipe:
    """The daemon's end of a TCP tap's socketpair and what it could not write yet."""

    sock: socket.socket
    pending: deque[bytes] = field(default_factory=deque)
    pending_bytes: int = 0
    ended: bool = False  # TapEnd: close once pending is written
    overflowed: bool = False
    watching: bool = False  # registered for EVENT_WRITE


@dataclass(slots=True, eq=False)
class Splice:
    """One splice from intend_splice until it is forgotten: the relay and its I/O glue."""

    relay: Relay
    # The daemon's connection records: None once the splice is compact (both
    # interfaces relay and the proxy let go of both fds, ``Splicer._compact``).
    client: Conn | None
    server: Conn | None = None
    timewait: Timer = field(default_factory=Timer)
    # A compact splice sleeps once punts have stopped for a while
    # (``_sleep_again``); ``sleep_at`` is when, as of the latest one.
    nap: Timer = field(default_factory=Timer)
    sleep_at: float = 0.0
    # Fast path entries installed for this splice (keys of arriving segments).
    offloaded: list[RelayKey] = field(default_factory=list)
    tap: TapPipe | None = None
    # A splice of two kernel connections (``splice_sockets``): their addresses
    # are the host's own, so what the fast path punts must come to this
    # interface (the TUN), never to the kernel, which has no socket for them.
    punt_ifindex: int = 0
    # Such a splice's hold entries after its fast path failed (``_fast_path_failed``).
    held: list[RelayKey] = field(default_factory=list)
    # The client's pure ACKs that came while an install waited (``Splicer.on_packet``).
    acks_held: list[tuple[VnetHeader | None, bytearray]] = field(default_factory=list)

    def conn(self, iface: Iface) -> Conn | None:
        return self.client if iface is CLIENT else self.server


class Splicer:
    def __init__(
        self,
        daemon: Daemon,
        fast_path: FastPathPort | None = None,
        egress: Callable[[bytes], int | None] | None = None,
    ) -> None:
        self.d = daemon
        self.intents: dict[int, Splice] = {}  # server-side conn id -> splice
        self.splices: set[Splice] = set()
        # Spliced 4-tuples (the daemon's LocalKey order) -> (splice, interface);
        # (None, interface) for a dormant splice (``_sleep``).
        self.flows: dict[LocalKey, tuple[Splice | None, Iface]] = {}
        self.counters = RelayCounters()
        self.fast_path = fast_path
        self._egress = egress  # destination address -> ifindex toward it
        self.fast_path_errors = 0
        # splice_sockets: a socket bound to the server side's local port
        # (repair.hold_port) until the splice is forgotten, keyed by the
        # daemon's 4-tuple of it.  Free, the port would be the kernel's to give
        # to the next connect() while the daemon still maps the 4-tuple (in
        # TIMEWAIT, say): the new connection's SYN-ACK would be taken for the
        # old splice's.  The client side needs none: a SYN reusing its 4-tuple
        # ends the old splice and goes back to the kernel (``Daemon._tcp_input``).
        self.port_holds: dict[LocalKey, socket.socket] = {}
        # Installs asked for in this loop pass, made at its end (``run_installs``).
        self.installs: dict[Splice, InstallFastPath] = {}

    # ----------------------------------------------------------- API ops

    def intend_splice(self, owner: int, conn_id: int, server_id: int | None = None) -> Result:
        c = self.d._conn(conn_id)
        self._check_spliceable(c, conn_id)
        if c.listener is not None or c.connect_done is not None:
            raise ApiError(ErrorCode.ESTATE, f"conn {conn_id} is not a connection you accepted")
        if server_id is not None:
            return self._intend_pair(owner, c, server_id)
        relay = Relay.intend(
            owner,
            c.tcp,
            self.d._new_id(),
            self.d.connect_config,
            msl=self.d.tcp_config.msl,
            offload=self.d.offload,
            counters=self.counters,
            max_ack_delay=self.d.config.max_server_ack_delay,
        )
        sp = Splice(relay, c)
        c.splice = sp
        c.hold_rx = True  # thesis 4.1: reading from the client stops here
        if c.pending is not None:
            # Taken out of the TCB but never delivered to the proxy: it belongs
            # to the server now, in front of what is still in the TCB.
            relay.reclaimed = bytes(c.pending)
            c.pending = None
        self.intents[relay.server_id] = sp
        self.splices.add(sp)
        return {"conn": relay.server_id}

    def _check_spliceable(self, c: Conn, conn_id: int) -> None:
        if c.splice is not None:
            raise ApiError(ErrorCode.ESTATE, f"conn {conn_id} is already part of a splice")
        if c.tcp_gone or c.tcp.state not in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT):
            raise ApiError(ErrorCode.ESTATE, f"conn {conn_id} is not established")

    def _intend_pair(self, owner: int, c: Conn, server_id: int) -> Result:
        """intend_splice with an established conn as the server side (beyond thesis 4.1).

        A proxy that keeps control over a persistent connection (HTTP/1.1)
        talks to the server itself, reads the response head, and splices
        only the body: both conns exist already.  Delivery to both fds
        stops here; the reply says how many bytes of each peer's stream
        are already in the proxy's fds (``delivered``): the proxy reads up
        to there, and what it has not consumed goes back with ``splice``
        (``unread``, ``server_unread``).  The server side keeps the options
        it negotiated; the translators convert (thesis 5.4).
        """
        s = self.d._conn(server_id)
        self._check_spliceable(s, server_id)
        if s.connect_done is not None or s.listener is not None or s.sock is None:
            raise ApiError(ErrorCode.ESTATE, f"conn {server_id} is not an established conn")
        sp = self._pair(owner, c, s, server_id)
        sp.relay.reclaimed = bytes(c.pending) if c.pending is not None else b""
        sp.relay.reclaimed_server = bytes(s.pending) if s.pending is not None else b""
        c.pending = s.pending = None
        return {"conn": server_id, "delivered": {"client": c.to_proxy, "server": s.to_proxy}}

    def _pair(self, owner: int, c: Conn, s: Conn, server_id: int, punt_ifindex: int = 0) -> Splice:
        """An intent over two established conns (``_intend_pair``, ``splice_sockets``)."""
        relay = Relay.intend(
            owner,
            c.tcp,
            server_id,
            self.d.connect_config,
            msl=self.d.tcp_config.msl,
            offload=self.d.offload,
            counters=self.counters,
        )
        relay.server_config = None  # nothing to connect
        sp = Splice(relay, c, s, punt_ifindex=punt_ifindex)
        for conn in (c, s):
            conn.splice = sp
            conn.hold_rx = True
        c.is_client, s.is_client = True, False  # either may have been the other before
        relay.server_connected(s.tcp)
        self.splices.add(sp)
        return sp

    def connect(
        self,
        owner: int,
        conn_id: int,
        remote: Address,
        local: Address | None,
        timeout: float,
        done: Done,
        want_fd: bool = True,
    ) -> None:
        sp = self.intents.get(conn_id)
        if sp is None:
            done(ApiError(ErrorCode.ENOENT, f"no intended server connection {conn_id}"), None)
            return
        if sp.server is not None:
            done(ApiError(ErrorCode.ESTATE, f"conn {conn_id} is already connected"), None)
            return
        config = sp.relay.server_config
        assert config is not None  # sealed only once both sides relay: no connect then
        if ":" in remote[0]:
            # IPv6's header is 20 bytes longer: offer the server no more than
            # our IPv6 MSS, whatever the client's (a splice across families).
            config = replace(config, mss=min(config.mss, self.d.tcp_config6.mss))
        conn = self.d._open(owner, remote, local, timeout, done, config)
        if conn is None:
            return
        conn.splice = sp
        conn.is_client = False
        conn.hold_rx = True  # thesis 4.1: the proxy never reads the server side
        conn.reserved_id = conn_id
        conn.want_fd = want_fd
        sp.server = conn

    def connect_splice(
        self,
        owner: int,
        client_id: int,
        remote: Address,
        local: Address | None,
        timeout: float,
        length: int,
        done: Done,
        inline: Inline | None = None,
    ) -> None:
        """intend_splice + connect + splice(len) in one op (docs/api.md, an optimisation)."""
        c = self.d._conn(client_id)
        sp = c.splice
        if sp is None:
            self.intend_splice(owner, client_id)
            sp = c.splice
            assert sp is not None
        elif sp.client is not c or sp.relay.spliced or sp.server is not None:
            # An intent whose server side is not connected may be retried
            # (the proxy's next address); anything else is a misuse.
            raise ApiError(ErrorCode.ESTATE, f"conn {client_id} is already part of a splice")
        server_id = sp.relay.server_id

        def connected(result: Result | ApiError, sock: socket.socket | None) -> None:
            if isinstance(result, ApiError):
                done(result, sock)
                return
            spliced = False
            # Only if the proxy read everything delivered on the client fd:
            # unread bytes belong to the server first, and only the proxy can
            # take them out of its end (then it calls splice with them).
            if not _unread_in(c.sock):
                try:
                    self.splice(owner, client_id, server_id, length)
                    spliced = True
                except ApiError as exc:
                    log.info(
                        "connect_splice: splice of conn %d left to the proxy: %s", client_id, exc
                    )
            result["spliced"] = spliced
            if spliced and inline is not None:
                sock = self._send_inline(sp, inline, result, sock)
            elif sock is None and sp.server is not None:
                # Made without an fd for a release that cannot happen now:
                # the proxy splices (and writes) itself, so it needs one.
                sock = self.d.attach_socket(sp.server)
            done(result, sock)

        # A conn the daemon releases at once needs no socketpair: it would
        # only be made, passed and closed on every new connection's path.
        want_fd = inline is None or not inline.release
        self.connect(owner, server_id, remote, local, timeout, connected, want_fd)

    def _send_inline(
        self, sp: Splice, inline: Inline, result: Result, sock: socket.socket | None
    ) -> socket.socket | None:
        """connect_splice's len bytes from the request, then maybe release both conns.

        The bytes take the path the proxy's own write to the client fd would
        (``proxy_data``), so the relay counts them against ``len`` alike; the
        round trip through the proxy that the write would cost is what this
        saves, on the path every new connection waits on.
        """
        c, s = sp.client, sp.server
        assert c is not None and s is not None
        data = inline.data
        if inline.local_at is not None:
            addr, port = s.tcp.local
            at = inline.local_at
            data = data[:at] + addr + port.to_bytes(2, "big") + data[at + LOCAL_AT_LEN :]
        self.proxy_data(c, data)
        if not inline.release:
            return sock
        # As if the proxy had closed both fds right after writing (thesis 4.2:
        # only the handles go; the splice flows on).
        if sock is not None:
            sock.close()
        self.d._close_conn(s)
        self.d._close_conn(c)
        result["released"] = True
        return None

    def server_connected(self, conn: Conn) -> None:
        sp = conn.splice
        assert sp is not None
        self.intents.pop(sp.relay.server_id, None)
        sp.relay.server_connected(conn.tcp)

    def connect_failed(self, conn: Conn) -> None:
        """The server side did not connect: the proxy may connect it again."""
        sp = conn.splice
        if sp is not None and sp.server is conn:
            sp.server = None
            sp.relay.connect_failed()

    def splice(
        self,
        owner: int,
        client_id: int,
        server_id: int,
        length: int,
        unread: bytes = b"",
        limits: tuple[int, int] | None = None,
        server_unread: bytes = b"",
        tap: bool = False,
    ) -> Result:
        c = self.d._conn(client_id)
        sp = c.splice
        if sp is None or sp.client is not c:
            raise ApiError(ErrorCode.ESTATE, f"conn {client_id}: call intend_splice first")
        relay = sp.relay
        if relay.server_id != server_id:
            raise ApiError(ErrorCode.ESTATE, f"conn {server_id} is not {client_id}'s server side")
        s = sp.server
        if s is None or relay.pair.server is not SpliceState.ESTABLISHED:
            raise ApiError(ErrorCode.ESTATE, f"conn {server_id} is not connected yet")
        if relay.spliced:
            raise ApiError(ErrorCode.ESTATE, "already spliced")
        if length < 0:
            raise ApiError(ErrorCode.EBADREQ, "len must be >= 0")
        if c.tcp_gone or s.tcp_gone:
            raise ApiError(ErrorCode.ECONNRESET, "a connection of the pair is gone")
        now = time.monotonic()
        # What the proxy wrote before calling splice is already in the
        # socketpairs: it goes out ahead of everything else.
        self.d._drain_proxy(c)
        self.d._drain_proxy(s)
        # From now on both 4-tuples are the relay's.
        for conn, iface in ((c, CLIENT), (s, SERVER)):
            relay.side(iface).outbox.extend(conn.outbox)
            conn.outbox.clear()
            conn.frozen = True
            conn.timer.cancel()
            self.d.flows.pop(conn.key, None)
            self.flows[conn.key] = (sp, iface)
        result: Result = {"client": client_id, "server": server_id, "len": length}
        if tap:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            ours.setblocking(False)
            with contextlib.suppress(OSError):
                ours.shutdown(socket.SHUT_RD)  # the proxy only reads a tap
            sp.tap = TapPipe(ours)
            result[TAP_SOCK] = theirs
        self.execute(sp, relay.splice(length, unread, now, limits, server_unread, tap))
        for conn in (c, s):
            self.d.dirty.add(conn)  # the pump watches the proxy's fd for its len bytes
        if limits is not None:
            result["server_limit"], result["client_limit"] = limits
        return result

    def splice_sockets(
        self,
        owner: int,
        c: Conn,
        s: Conn,
        punt_ifindex: int,
        held: list[RelayKey],
        port_hold: socket.socket | None,
    ) -> None:
        """Splice two kernel connections the daemon has taken over (Daemon.splice_sockets).

        ``c`` and ``s`` hold their TCBs as restored (no descriptor); ``held`` the
        fast path's hold entries that send their segments to the TUN until
        the translation replaces them.  From here on it is the thesis's
        splice of two established connections with nothing more to come
        from the proxy (len 0), released at once as if the proxy had closed
        both descriptors: the TCBs send what the peers have not
        acknowledged, the client's unread bytes go to the server first, and
        the relay moves each side to SPLICED and into the kernel.
        """
        sp = self._pair(owner, c, s, self.d._new_id(), punt_ifindex)
        sp.offloaded.extend(held)
        for conn, iface in ((c, CLIENT), (s, SERVER)):
            conn.frozen = True
            self.flows[conn.key] = (sp, iface)
        self.counters.kernel_sockets += 1
        if port_hold is not None:
            self.port_holds[s.key] = port_hold
        self.execute(sp, sp.relay.splice(0, b"", time.monotonic(), None, b"", False))
        for conn in (c, s):
            self.d._close_conn(conn)  # released: no descriptor, no id, as if closed

    def reset_pair(self, tcbs: list[TcpConnection], now: float) -> bool:
        """Abort and forget the splice of these TCBs; False if it sent no RST (or was none)."""
        for tcb in tcbs:
            hit = self.flows.get((tcb.local[0], tcb.local[1], tcb.remote[0], tcb.remote[1]))
            sp = hit[0] if hit is not None else None
            if sp is not None:
                aborted = sp.relay.spliced
                if aborted:
                    self.execute(sp, sp.relay.abort(now))
                if sp in self.splices:
                    self._tear_down(sp)
                return aborted
        return False

    def client_gone(self, owner: int) -> None:
        """Unspliced intents die with their proxy; spliced pairs keep flowing."""
        for sp in list(self.splices):
            if sp.relay.owner == owner and not sp.relay.spliced:
                self.intents.pop(sp.relay.server_id, None)
                self.splices.discard(sp)
                if sp.server is not None:
                    sp.server.splice = None
                if sp.client is not None:
                    sp.client.splice = None

    def conn_freed(self, conn: Conn) -> None:
        """A connection of an intent (not spliced yet) is gone: so is the intent."""
        sp = conn.splice
        conn.splice = None
        if sp is None or sp.relay.spliced:
            return
        if conn is sp.server:
            sp.server = None  # the proxy may still connect the intent again
            sp.relay.connect_failed()
            return
        self.intents.pop(sp.relay.server_id, None)
        self.splices.discard(sp)
        if sp.server is not None:
            sp.server.splice = None
            if not sp.server.tcp_gone:
                self.d._close_conn(sp.server)

    def stats(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for sp in self.splices:
            row = sp.relay.stats()
            row["client"] = sp.client.id if sp.client is not None else None
            row["server"] = sp.relay.server_id
            if sp.offloaded and self.fast_path is not None:
                # The kernel's share of the traffic, per direction.
                pc, bc = self.fast_path.counters(sp.offloaded[0])
                ps, bs = self.fast_path.counters(sp.offloaded[1])
                row["packets_c2s"] = int(str(row["packets_c2s"])) + pc
                row["bytes_c2s"] = int(str(row["bytes_c2s"])) + bc
                row["packets_s2c"] = int(str(row["packets_s2c"])) + ps
                row["bytes_s2c"] = int(str(row["bytes_s2c"])) + bs
                row["fast_path_packets"] = pc + ps
            out.append(row)
        for local, hit in self.flows.items():
            if hit is _DORMANT_CLIENT:
                dormant = self._dormant_row(local)
                if dormant is not None:
                    out.append(dormant)
        return out

    # ------------------------------------------------------- proxy bytes

    def proxy_data(self, conn: Conn, data: bytes) -> None:
        """Bytes the proxy wrote to a frozen connection's fd (thesis 4.1 rules)."""
        sp = conn.splice
        if sp is None:
            return
        iface = CLIENT if conn is sp.client else SERVER
        self.execute(sp, sp.relay.on_proxy_data(iface, data, time.monotonic()))

    def proxy_done(self, conn: Conn) -> None:
        """The proxy let go of a spliced fd: no more of its len bytes will come."""
        sp = conn.splice
        if sp is None:
            return
        iface = CLIENT if conn is sp.client else SERVER
        if iface is CLIENT and sp.relay.len_remaining > 0:
            log.warning(
                "proxy closed with %d of its announced bytes unwritten", sp.relay.len_remaining
            )
        self.execute(sp, sp.relay.on_proxy_done(iface, time.monotonic()))

    def released(self, conn: Conn) -> None:
        """The proxy closed a spliced conn (fd and id): maybe the splice can be compact."""
        sp = conn.splice
        if sp is not None and sp in self.splices:
            self._compact(sp)

    def _compact(self, sp: Splice) -> None:
        """Forget the daemon's connection records of a splice that no longer needs them.

        Once both interfaces relay (their TCBs fell silent and the relay
        dropped them) and the proxy has let go of both fds (closed, every
        announced byte taken), a Conn holds nothing but a dead TCB, a
        socketpair slot and timers: a few KB per idle splice.  The relay
        keeps what it relays with (base points, translators, Fig. 5.1 states).
        """
        c, s = sp.client, sp.server
        if c is None or s is None:
            return
        for conn in (c, s):
            if conn.sock is not None or conn.id is not None or conn.pending is not None:
                return
        if not sp.relay.seal():  # the relay decides whether both sides are done with it
            return
        for conn in (c, s):
            conn.timer.cancel()
            conn.connect_timer.cancel()
            conn.splice = None
            self.d.dirty.discard(conn)
        sp.client = sp.server = None
        self.counters.compacted += 1
        self._sleep_again(sp, time.monotonic(), FIRST_NAP_AFTER)

    # ------------------------------------------------------- dormancy

    def _sleep(self, sp: Splice) -> None:
        """Forget a compact splice that lives wholly in the kernel; its map entries are it.

        Everything a relay needs is in its two map entries (the translation,
        and the side and Fig. 5.1 state notes a restarted daemon adopts
        from, daemon/fastpath/adopt.py), so the relay is dropped and its
        4-tuples map to a shared marker: ~3 KB of Python objects per idle
        splice become the two flow-table keys.  The first segment the
        kernel punts (a FIN, a RST, an unusual option) wakes it (``_wake``).
        What the relay itself relayed is added to the entries' relay share,
        so ``stats`` still sums both.  The kernel keeps its own count apart
        from the entries (splice_map.h ``struct splice_count``): a splice
        may fall asleep in the middle of a bulk transfer the kernel carries,
        and rewriting its entries then loses none of it.  TIMEWAIT (a timer)
        and anything bounded or tapped stay awake.
        """
        fp = self.fast_path
        r = sp.relay
        if fp is None or not self.handed_over(sp) or r.pair.client is SpliceState.TIMEWAIT:
            return
        try:
            fp.add_counters(sp.offloaded[0], r.packets_c2s, r.bytes_c2s)
            fp.add_counters(sp.offloaded[1], r.packets_s2c, r.bytes_s2c)
        except (OSError, KeyError) as exc:
            self._fast_path_failed(sp, f"sleep: {exc}")
            return
        r.packets_c2s = r.bytes_c2s = r.packets_s2c = r.bytes_s2c = 0
        self.splices.discard(sp)
        for side in (r.client, r.server):
            assert side is not None
            self.flows[(side.local[0], side.local[1], side.remote[0], side.remote[1])] = _DORMANT[
                side.iface
            ]
        self.counters.slept += 1

    def _wake(self, pkt: memoryview, now: float) -> Splice | None:
        """A dormant splice's relay again, from its map entries, for the segment ``pkt``."""
        if pkt[0] >> 4 == 6:
            ip6 = Ipv6Packet(pkt)
            sport, dport = struct.unpack_from("!HH", ip6.payload)
            return self._wake_key((ip6.src_addr, sport, ip6.dst_addr, dport), now)
        ihl = (pkt[0] & 0x0F) * 4
        sport, dport = struct.unpack_from("!HH", pkt, ihl)
        return self._wake_key((bytes(pkt[12:16]), sport, bytes(pkt[16:20]), dport), now)

    def _wake_key(self, key: RelayKey, now: float) -> Splice | None:
        """A dormant splice's relay again, from its map entries; ``key``: a segment's 4-tuple."""
        local: LocalKey = (key[2], key[3], key[0], key[1])
        fp = self.fast_path
        v = fp.entry(key) if fp is not None else None
        found: list[InheritedSplice] = []
        gone = [local]
        partner: RelayKey | None = None
        if fp is not None and v is not None:
            partner = reverse_key(v)
            gone.append((partner[2], partner[3], partner[0], partner[1]))
            w = fp.entry(partner)
            if w is not None:
                found, _ = adoptable(
                    [(key, v), (partner, w)],
                    ours=lambda _a: True,
                    links=None,
                    offload=self.d.offload,
                    host=lambda _a: True,
                )
        if not found:
            # Cannot happen unless the map was changed behind our back: its
            # 4-tuples are unknown from now on (a RST), never mistranslated.
            log.warning("dormant splice of %s has no sound map entries; forgotten", key)
            if fp is not None and v is not None:
                for k in (key, partner):  # neither direction may run on, nor its count stay
                    if k is not None:
                        with contextlib.suppress(OSError):
                            fp.remove(k)
            for k in gone:
                hit = self.flows.get(k)
                if hit is not None and hit[0] is None:
                    del self.flows[k]
            return None
        self.counters.woken += 1
        return self._revive(found[0], now)

    def _revive(self, inh: InheritedSplice, now: float) -> Splice:
        """A relay for a splice whose entries are in the map (woken, or adopted)."""
        relay, actions = Relay.adopt(
            self.d._new_id(),
            (inh.client_key, inh.server_key),
            inh.c2s,
            inh.s2c,
            inh.states,
            inh.fin_acks,
            msl=self.d.tcp_config.msl,
            offload=self.d.offload,
            counters=self.counters,
            now=now,
        )
        sp = Splice(
            relay,
            None,
            None,
            offloaded=[inh.client_key, inh.server_key],
            punt_ifindex=inh.client_value.punt_ifindex,
        )
        self.splices.add(sp)
        for side in (relay.client, relay.server):
            assert side is not None
            self.flows[(side.local[0], side.local[1], side.remote[0], side.remote[1])] = (
                sp,
                side.iface,
            )
        self.execute(sp, actions)
        return sp

    def dormant(self) -> int:
        """How many splices live only in the kernel's map now (one marker each is CLIENT's)."""
        return sum(1 for hit in self.flows.values() if hit is _DORMANT_CLIENT)

    def _dormant_row(self, local: LocalKey) -> dict[str, object] | None:
        """The ``stats`` row of a dormant splice, from its map entries (client side's key)."""
        fp = self.fast_path
        key = (local[2], local[3], local[0], local[1])
        v = fp.entry(key) if fp is not None else None
        if fp is None or v is None:
            return None
        partner = reverse_key(v)
        w = fp.entry(partner)
        if w is None:
            return None
        states = [STATE_OF_CODE.get(x.state) for x in (v, w)]
        # The kernel's count plus the share the relay relayed (``_sleep``).
        packets_c2s, bytes_c2s = fp.counters(key)
        packets_s2c, bytes_s2c = fp.counters(partner)
        return {
            "client_state": states[0].name if states[0] is not None else None,
            "server_state": states[1].name if states[1] is not None else None,
            "bytes_c2s": bytes_c2s,
            "bytes_s2c": bytes_s2c,
            "packets_c2s": packets_c2s,
            "packets_s2c": packets_s2c,
            "queued": 0,
            "queue_drops": 0,
            "len_remaining": 0,
            "fast_path": True,
            "fast_path_packets": packets_c2s + packets_s2c,
            "bounded": False,
            "tapped": None,
            "dormant": True,
            "client": None,
            "server": None,
        }

    # ---------------------------------------------------------- packets

    def on_packet(
        self,
        sp: Splice | None,
        iface: Iface,
        vnet: VnetHeader | None,
        pkt: memoryview,
        now: float,
    ) -> bool:
        """A segment of a spliced connection; False when it opens a new connection instead.

        ``sp`` None: the splice is dormant (the kernel punted this segment
        to it): it wakes first.
        """
        if sp is None:
            sp = self._wake(pkt, now)
            if sp is None:
                return False  # its entries are gone: an unknown 4-tuple (a RST)
        elif self.installs and iface is CLIENT and sp in self.installs and _pure_ack(pkt):
            # The install waits for what the TUN holds (run_installs); each
            # client ACK relayed meanwhile lets the server send more into it,
            # and a fast sender kept it from ever running dry (a 16 MB
            # download handed over mid-transfer went wholly through Python).
            # Held, the ACKs go on right after the install.
            sp.acks_held.append((vnet, bytearray(pkt)))
            return True
        keep = self.execute(sp, sp.relay.on_packet(iface, vnet, pkt, now))
        self._sleep_again(sp, now)
        return keep

    def _may_sleep(self, sp: Splice) -> bool:
        return (
            bool(sp.offloaded)  # only the kernel's punts reach an offloaded splice here
            and sp.client is None
            and sp.server is None
            and sp.relay.pair.client is SpliceState.SPLICED
            and sp.relay.pair.server is SpliceState.SPLICED
            and sp in self.splices
        )

    def _sleep_again(self, sp: Splice, now: float, after: float = NAP_AFTER) -> None:
        """A compact splice that punted segments did not move sleeps again, once they stop.

        (A retransmitted SYN-ACK, an unusual option, an ICMP; and the first
        sleep of a splice that just became compact, ``FIRST_NAP_AFTER``.)  Not at once:
        a peer whose every segment the kernel punts (IP options, a packet
        too big for a shrunk link) would otherwise cost a wake and a sleep,
        four map syscalls and a relay rebuilt, per packet.  One that is
        closing stays awake through its few remaining punts.
        """
        if not self._may_sleep(sp):
            return
        sp.sleep_at = now + after
        if sp.nap.deadline is None:
            self.d.timers.schedule(sp.nap, now + after, partial(self._nap, sp))

    def _nap(self, sp: Splice) -> None:
        sp.nap = Timer()  # the fired entry is spent
        if not self._may_sleep(sp):
            return
        if time.monotonic() < sp.sleep_at:
            self.d.timers.schedule(sp.nap, sp.sleep_at, partial(self._nap, sp))
            return
        self._sleep(sp)

    def frag_needed(self, local: LocalKey, msg: Unreachable, now: float) -> bytes | None:
        """The ICMP for the peer of a spliced flow whose relayed segment was too big (RFC 1191).

        ``local``: the connection the router's ICMP quotes (the daemon's
        LocalKey order).  None if no splice relays onto it (yet): the
        connection's own TCB then answers for its own segments.
        """
        hit = self.flows.get(local)
        if hit is None:
            return None
        sp, iface = hit
        if sp is None:
            sp = self._wake_key((local[2], local[3], local[0], local[1]), now)
            if sp is None:
                return None
        icmp = sp.relay.frag_needed(iface, msg.seq, msg.mtu, msg.quoted_len)
        self._sleep_again(sp, now)
        return icmp

    def _on_timer(self, sp: Splice, iface: Iface) -> None:
        self.execute(sp, sp.relay.on_timer(iface, time.monotonic()))

    def _on_timewait(self, sp: Splice) -> None:
        self.execute(sp, sp.relay.on_timewait_expired(time.monotonic()))

    # ------------------------------------------------------------ actions

    def execute(self, sp: Splice, actions: list[Action]) -> bool:
        """Carry out what the relay asked for; False if it asked to reopen the 4-tuple."""
        keep = True
        d = self.d
        for a in actions:
            match a:
                case Write(vnet, packet):
                    d.tun_write(vnet, packet)
                case Emit(_, tcb, segments):
                    for seg in segments:
                        d._write_segment(tcb.local, tcb.remote, seg, tcb.snd_mss, tcb.flow_label)
                case ArmTimer(iface, deadline):
                    conn = sp.conn(iface)
                    if conn is None:
                        continue
                    if deadline is None:
                        conn.timer.cancel()
                    else:
                        d.timers.schedule(conn.timer, deadline, partial(self._on_timer, sp, iface))
                case ArmTimewait(deadline):
                    d.timers.schedule(sp.timewait, deadline, partial(self._on_timewait, sp))
                case TearDown():
                    self._tear_down(sp)
                case Reopen():
                    keep = False
                case HandBack():
                    self._hand_back(sp, a)
                case TapData(data):
                    self._tap_write(sp, data)
                case TapEnd():
                    if sp.tap is not None:
                        sp.tap.ended = True
                        self._tap_flush(sp)
                case InstallFastPath():
                    self.installs[sp] = a  # at the end of the pass: see run_installs
                case WatchFinAck(key, fin_ack):
                    pending = self.installs.get(sp)
                    if pending is not None:
                        # Not in the map yet: the entry goes in with this watch.
                        self.installs[sp] = InstallFastPath(
                            tuple(
                                (k, t, fin_ack if k == key else w, lim)
                                for k, t, w, lim in pending.entries
                            )
                        )
                    elif self.fast_path is not None and key in sp.offloaded:
                        # The side's Fig. 5.1 state goes with it, for a daemon
                        # that adopts the entry after a restart.
                        iface = CLIENT if key == sp.relay.client.key else SERVER
                        try:
                            self.fast_path.watch_fin_ack(key, fin_ack, sp.relay.pair.state(iface))
                        except (OSError, KeyError) as exc:
                            self._fast_path_failed(sp, f"watch FIN ACK: {exc}")
                case ProxyMisuse(iface, message):
                    conn = sp.conn(iface)
                    if conn is not None and conn.id is not None:
                        d.api.push_event(
                            conn.owner,
                            {
                                "event": "error",
                                "conn": conn.id,
                                "error": ErrorCode.ESTATE.value,
                                "message": message,
                            },
                        )
        return keep

    def run_installs(self) -> None:
        """Put this pass's splices into the fast path, after what the TUN holds for them.

        A segment the kernel punted before the entry existed may still wait
        in the TUN's queue; with the entry in, the next segment of the same
        flow would be redirected in microseconds and overtake it (seen in a
        capture: a 14 KB segment on the wire before the 8 KB one the server
        sent first, and its TSval one older).  So the queue is read and
        relayed first; only a segment punted in the microseconds between that
        read and the map update can still be overtaken.  Meanwhile the
        client's ACKs wait (``on_packet``), so that the server stops at its
        window and the queue runs dry.
        """
        rounds = 0
        while self.installs and rounds < 4:
            rounds += 1
            if self.fast_path is not None:
                self.d.drain_tun()
            batch, self.installs = self.installs, {}
            for sp, a in batch.items():
                if sp not in self.splices or not sp.relay.fast_path:
                    continue
                try:
                    self._install(sp, a)
                    self._release_acks(sp)
                    # Both interfaces relay now: one of the two moments (with
                    # the proxy's close, ``released``) a splice may turn compact.
                    if sp in self.splices:
                        self._compact(sp)
                except Exception:
                    # As for a packet (Daemon._on_tun): a bug costs this
                    # splice its fast path, never the daemon and the others.
                    self.d.counters["internal_errors"] += 1
                    log.exception("internal error installing splice %d", sp.relay.server_id)
                    self._fast_path_failed(sp, "install: internal error")
            for sp in batch:
                if sp.acks_held and sp not in self.installs:
                    self._release_acks(sp)  # not installed after all: relayed as they are

    def _release_acks(self, sp: Splice) -> None:
        """The client's ACKs held while the install waited, on their way in arrival order."""
        held, sp.acks_held = sp.acks_held, []
        now = time.monotonic()
        for vnet, pkt in held:
            if sp not in self.splices:
                return
            try:
                self.execute(sp, sp.relay.on_packet(CLIENT, vnet, memoryview(pkt), now))
            except Exception:
                # As for any packet (Daemon._on_tun): a bug costs this ACK
                # (the next one covers it), never the daemon.
                self.d.counters["internal_errors"] += 1
                log.exception("internal error on a held ACK")

    def _install(self, sp: Splice, a: InstallFastPath) -> None:
        fp = self.fast_path
        if fp is None or self._egress is None:
            return
        pair = sp.relay.pair
        try:
            for i, iface in enumerate((CLIENT, SERVER)):
                key, t, fin_ack, limit = a.entries[i]
                # The output connection's real addresses (the translator's
                # are placeholders for an IPv6 one): the other entry's key.
                partner = a.entries[1 - i][0]
                out = (partner[2], partner[0])
                ifindex = self._egress(out[1])
                if ifindex is None:
                    raise OSError(f"no route toward {out[1].hex()}")
                # The watch goes in with the entry: see FastPath.install.
                fp.install(
                    key, t, ifindex, limit, fin_ack, iface, pair.state(iface), out, sp.punt_ifindex
                )
                if key not in sp.offloaded:  # a held key is there from the start
                    sp.offloaded.append(key)
        except (OSError, ValueError, KeyError) as exc:
            self._fast_path_failed(sp, f"install: {exc}")

    def _fast_path_failed(self, sp: Splice, why: str) -> None:
        """The splice stays correct on the Python path; say so once per splice."""
        self.fast_path_errors += 1
        log.warning("fast path %s; splice %d stays in the daemon", why, sp.relay.server_id)
        self._offload_removed(sp)
        fp, r = self.fast_path, sp.relay
        if sp.punt_ifindex and fp is not None and r.server is not None:
            # A kernel-socket splice's 4-tuples are the host's own: with no
            # entry the kernel would take their segments and, having no
            # socket, answer each with a RST.  Hold entries keep them coming
            # to the TUN, where the relay carries on in Python.
            for key in (r.client.key, r.server.key):
                try:
                    fp.hold(key, sp.punt_ifindex)
                except OSError as exc:
                    log.error("cannot hold splice %d's segments: %s", r.server_id, exc)
                    continue
                sp.held.append(key)

    def _offload_removed(self, sp: Splice) -> None:
        self.installs.pop(sp, None)
        fp = self.fast_path
        relay = sp.relay
        for i, key in enumerate(sp.offloaded):
            try:
                packets, nbytes = fp.remove(key) if fp is not None else (0, 0)
            except OSError:
                packets = nbytes = 0
            # Keep the kernel's share in the relay's totals.
            if i == 0:
                relay.packets_c2s += packets
                relay.bytes_c2s += nbytes
            else:
                relay.packets_s2c += packets
                relay.bytes_s2c += nbytes
        sp.offloaded.clear()
        if fp is not None:
            for key in sp.held:
                with contextlib.suppress(OSError):
                    fp.remove(key)
        sp.held.clear()

    def _hand_back(self, sp: Splice, hb: HandBack) -> None:
        """A bounded splice is over: both conns are the proxy's ordinary conns again.

        The TCBs resumed in the relay; here the 4-tuples go back to the
        daemon's own table, delivery to the fds resumes (bytes returned at
        the freeze first), the segments held beyond the limits go through
        the ordinary input into the TCBs, and the proxy hears of it.
        """
        c, s = sp.client, sp.server
        assert c is not None and s is not None  # a bounded splice is never compact
        d = self.d
        now = time.monotonic()
        self._offload_removed(sp)  # the TCBs own both 4-tuples again
        self.splices.discard(sp)
        for conn, iface in ((c, CLIENT), (s, SERVER)):
            self.flows.pop(conn.key, None)
            d.flows[conn.key] = conn
            conn.splice = None
            conn.frozen = conn.hold_rx = False
            returned = hb.returned[iface]
            if returned:
                conn.pending = memoryview(returned)
            if conn.sock is None and not conn.tcp_gone:
                conn.tcp.close()  # the proxy let go during the splice: as its close
            d.dirty.add(conn)
        for iface in (CLIENT, SERVER):
            for hdr, raw in hb.held[iface]:
                vnet = VnetHeader.parse(hdr) if hdr is not None else None
                d._input(vnet, memoryview(bytearray(raw)), now)
        event: dict[str, object] = {
            "event": "unspliced",
            "client": c.id,
            "server": s.id,
            "bytes_c2s": hb.relayed[0],
            "bytes_s2c": hb.relayed[1],
        }
        if sp.relay.tap is not None:
            event["tapped"] = sp.relay.tap.copied
            event["tap_overflow"] = sp.tap is None or sp.tap.overflowed
        if c.id is not None or s.id is not None:
            # After the splice op's reply when the hand-back came inside it
            # (limits met at the freeze): a timer runs after this request.
            d.timers.schedule(Timer(), now, partial(d.api.push_event, c.owner, event))

    # ------------------------------------------------------------ the tap

    def _tap_write(self, sp: Splice, data: bytes) -> None:
        """Tap bytes toward the proxy; a reader too far behind overflows the tap.

        The splice never waits for the tap (the issue's rule: a slow reader
        must not stall the transfer): past ``TAP_BACKLOG`` unread bytes the
        tap is closed early and the proxy told (``tap_overflow``).
        """
        tap = sp.tap
        if tap is None or tap.overflowed:
            return
        tap.pending.append(data)
        tap.pending_bytes += len(data)
        self._tap_flush(sp)
        if tap.pending_bytes > TAP_BACKLOG:
            tap.overflowed = True
            log.info("tap of splice %d overflowed; closed early", sp.relay.server_id)
            self._tap_close(tap)
            conn = sp.client
            if conn is not None and conn.id is not None:
                self.d.api.push_event(conn.owner, {"event": "tap_overflow", "conn": conn.id})

    def _tap_flush(self, sp: Splice) -> None:
        tap = sp.tap
        if tap is None or tap.overflowed:
            return
        while tap.pending:
            chunk = tap.pending[0]
            try:
                n = tap.sock.send(chunk)
            except BlockingIOError:
                break
            except OSError:
                # The proxy closed its end: nobody reads the tap any more.
                tap.pending.clear()
                tap.pending_bytes = 0
                tap.overflowed = True
                self._tap_close(tap)
                return
            tap.pending_bytes -= n
            if n < len(chunk):
                tap.pending[0] = chunk[n:]
                break
            tap.pending.popleft()
        if tap.pending and not tap.watching:
            tap.watching = True
            self.d.sel.register(tap.sock, selectors.EVENT_WRITE, lambda _m: self._tap_flush(sp))
        elif not tap.pending:
            if tap.watching:
                tap.watching = False
                self.d.sel.unregister(tap.sock)
            if tap.ended:
                self._tap_close(tap)

    def _tap_close(self, tap: TapPipe) -> None:
        if tap.watching:
            tap.watching = False
            self.d.sel.unregister(tap.sock)
        tap.pending.clear()
        tap.pending_bytes = 0
        tap.sock.close()

    def _tear_down(self, sp: Splice) -> None:
        """Forget the pair: later segments of either connection get a RST."""
        self._offload_removed(sp)
        sp.timewait.cancel()
        sp.nap.cancel()
        if sp.tap is not None and not sp.tap.overflowed:
            # What was tapped still reaches the reader; then EOF.
            sp.tap.ended = True
            self._tap_flush(sp)
        self.splices.discard(sp)
        self.intents.pop(sp.relay.server_id, None)
        # By the relay's sides, not the Conns: a compact splice has none.
        for side in (sp.relay.client, sp.relay.server):
            if side is not None:
                key = (side.local[0], side.local[1], side.remote[0], side.remote[1])
                if self.flows.get(key, (None,))[0] is sp:
                    del self.flows[key]
                hold = self.port_holds.pop(key, None)
                if hold is not None:
                    hold.close()  # the port is the kernel's to give again
        for conn in (sp.client, sp.server):
            if conn is not None:
                if sp.relay.bounded and conn.id is not None:
                    # The proxy waits for the hand-back: tell it there is none.
                    self.d.api.push_event(conn.owner, {"event": "reset", "conn": conn.id})
                conn.splice = None
                self.d._free(conn)

    def handed_over(self, sp: Splice) -> bool:
        """Can the next daemon adopt this splice from its map entries alone?"""
        r = sp.relay
        return (
            len(sp.offloaded) == 2
            and not r.bounded
            and r.tap is None
            and r.pair.client in _ADOPTABLE
            and r.pair.server in _ADOPTABLE
        )

    def adopt(self, inherited: list[InheritedSplice], now: float) -> None:
        """Take over splices a dead daemon left in the kernel (``daemon.fastpath.adopt``).

        Their entries are in the fast path's map already (preloaded before
        the program was attached); here they get their relays, flow table
        entries and, in TIMEWAIT, their 2MSL timer, so their FINs, RSTs and
        the end of TIMEWAIT are handled as if this daemon had made them.
        """
        for inh in inherited:
            self.counters.adopted += 1
            if inh.client_value.punt_ifindex:
                self._hold_port_again(inh.server_key)
            if inh.states == (SpliceState.SHUTDOWN,) * 2:
                self._revive(inh, now)  # TIMEWAIT: its 2MSL timer needs the relay
                continue
            # Dormant until the kernel punts a segment of it (``_wake``).
            for key, iface in ((inh.client_key, CLIENT), (inh.server_key, SERVER)):
                self.flows[(key[2], key[3], key[0], key[1])] = _DORMANT[iface]

    def _hold_port_again(self, server_key: RelayKey) -> None:
        """An adopted kernel-socket splice's server-side port, held again (``port_holds``).

        The dead daemon's hold died with it: from then until now the
        kernel could have given the port to a new connection to the same
        server, and its segments would have been the splice's.  If it did,
        the bind fails: logged, and the splice goes on without a hold.
        """
        local: LocalKey = (server_key[2], server_key[3], server_key[0], server_key[1])
        try:
            hold = bind_port((local[0], local[1]))
        except OSError as exc:
            addr = ipaddress.ip_address(local[0])
            log.warning("adopted splice: cannot hold port %d of %s again: %s", local[1], addr, exc)
            return
        self.port_holds[local] = hold

    def terminate(self, now: float, handover: bool = False) -> None:
        """The daemon stops: reset every splice (RST to both peers, thesis 5.1).

        ``handover``: a splice wholly in the kernel's map stays there, for
        the next daemon to adopt (``adopt``); only the others are reset.
        """
        kept = 0
        for local, hit in list(self.flows.items()):
            if hit[0] is None:  # dormant: wholly in the kernel's map
                if handover:
                    kept += hit is _DORMANT_CLIENT
                elif self.fast_path is not None:
                    with contextlib.suppress(OSError):
                        self.fast_path.remove((local[2], local[3], local[0], local[1]))
                del self.flows[local]
        for sp in list(self.splices):
            if handover and self.handed_over(sp):
                kept += 1
                continue
            if sp.relay.spliced:
                self.execute(sp, sp.relay.abort(now))
            if sp in self.splices:
                self._tear_down(sp)
        if handover:
            log.info("leaving %d splice(s) in the kernel for the next daemon", kept)
        for hold in self.port_holds.values():
            hold.close()
        self.port_holds.clear()


def _unread_in(sock: socket.socket | None) -> bool:
    """Does the proxy's end of this socketpair still hold bytes we wrote (SIOCOUTQ > 0)?"""
    if sock is None:
        return False
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf)
    except OSError:
        return True  # cannot tell: let the proxy take the bytes, as with splice
    return buf[0] > 0


__all__ = ["FastPathPort", "Splice", "Splicer"]


def _pure_ack(pkt: memoryview) -> bool:
    """A TCP segment with only ACK set and no payload (IPv4, or IPv6 with no extension header).

    A few byte reads, not ``translator.peek``: that one builds a SegmentInfo the
    relay builds again, and knows only IPv4 (the relay reshapes IPv6 first).
    """
    if len(pkt) < 40:
        return False
    version = pkt[0] >> 4
    if version == 4:
        ihl = (pkt[0] & 0x0F) * 4
        total = (pkt[2] << 8) | pkt[3]
        if pkt[9] != 6 or len(pkt) < ihl + 20:
            return False
        tcp = ihl
        payload = total - ihl
    elif version == 6 and len(pkt) >= 60 and pkt[6] == 6:
        tcp = 40
        payload = (pkt[4] << 8) | pkt[5]
    else:
        return False
    return pkt[tcp + 13] == 0x10 and payload == (pkt[tcp + 12] >> 4) * 4
