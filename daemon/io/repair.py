"""Take a live kernel TCP connection over: read its state with TCP_REPAIR, close it silently.

The thesis's proxy splices two *kernel* sockets; ours splices connections
the daemon's own TCP terminates, so every handshake and every byte before
the splice crosses Python, and that is what a spliced connection's set-up
costs (docs/architecture.md, "Connection setup").  The way out is the
thesis's own model: the proxy runs on kernel sockets and hands both to the
daemon at splice time, which takes each connection over as it stands, the
way CRIU checkpoints one (TCP_REPAIR, Linux 3.5+):

* in repair mode the socket sends nothing of its own (no FIN, no RST on
  close, no window updates) and answers the queries below;
* ``TCP_QUEUE_SEQ`` per queue gives ``write_seq`` (the next byte the
  application would write) and ``rcv_nxt``; ``SIOCOUTQ``/``SIOCINQ`` the
  queues' lengths, so ``snd_una = write_seq - outq``; a ``MSG_PEEK`` read
  with a queue selected returns its bytes: what the peer has not
  acknowledged yet (to be retransmitted by whoever takes over), and what
  arrived and the application did not read (to be relayed);
* ``TCP_REPAIR_WINDOW`` the window state (RFC 9293 3.3.1: SND.WND, SND.WL1,
  RCV.WND and the right edge last advertised), ``TCP_TIMESTAMP`` the
  socket's timestamp clock (the TSval it would send now), ``TCP_INFO`` the
  negotiated options (timestamps, SACK, window scale and both shifts, ECN);
* the peer's newest TSval (``ts_recent``) and the MSS it offered are in no
  socket option: daemon/fastpath/sockprobe.py reads them with a BPF program.

One thing is written before the read (``forward_unread``): what the client
connection received and the proxy never read (typically the client's first
request, sent the moment it had the proxy's reply) is handed to the server
socket with an ordinary send, so the kernel transmits it at once instead of
a restored TCB in Python after the whole take-over; the server socket's
take-over then finds it among the bytes the server has not acknowledged.

This module reads; it does not stop the connection's segments from reaching
the socket meanwhile (the caller does that first, else bytes acknowledged
by the socket after the read would be lost to the splice), and it
does not build the daemon's TCB from what it read.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import fcntl
import os
import socket
import struct
import termios
from pathlib import Path

from daemon.fastpath.sockprobe import SockProbe
from daemon.io import tcp_info
from daemon.tcp.config import Endpoint
from daemon.tcp.kernel_state import KernelTcpState
from daemon.wire.flowlabel import kernel_flow_label

__all__ = [
    "KernelTcpState",
    "RepairError",
    "bind_port",
    "close_silently",
    "endpoints",
    "forward_unread",
    "give_back",
    "hold_port",
    "take_over",
]

# linux/tcp.h
TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29
FORWARD_CHUNK = 256 * 1024
TCP_RECV_QUEUE, TCP_SEND_QUEUE = 1, 2
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE, TCPI_OPT_ECN = 1, 2, 4, 8
TCP_ESTABLISHED, TCP_CLOSE_WAIT = 1, 8
IPV6_AUTOFLOWLABEL = 70  # linux/in6.h

TCP_INFINITE_SSTHRESH = 0x7FFFFFFF


class RepairError(OSError):
    """The socket cannot be taken over (not TCP, not connected, not in this namespace)."""


_V4_MAPPED = bytes(10) + b"\xff\xff"  # ::ffff:0:0/96 (RFC 4291 2.5.5.2)


def _endpoint(sockaddr: tuple[str, int] | tuple[str, int, int, int]) -> Endpoint:
    if len(sockaddr) == 2:
        return socket.inet_pton(socket.AF_INET, sockaddr[0]), sockaddr[1]
    packed = socket.inet_pton(socket.AF_INET6, sockaddr[0].split("%")[0])
    if packed[:12] == _V4_MAPPED:
        packed = packed[12:]  # a dual-stack socket's IPv4 peer: its segments are IPv4
    return packed, sockaddr[1]


def _u32(sock: socket.socket, opt: int) -> int:
    value: int = struct.unpack("I", sock.getsockopt(socket.IPPROTO_TCP, opt, 4))[0]
    return value


def _ioctl_int(sock: socket.socket, request: int) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), request, buf)
    return buf[0]


def _peek_queue(sock: socket.socket, queue: int, length: int) -> bytes:
    """A repair-mode queue's bytes (MSG_PEEK: they stay; the socket is closed after)."""
    if length == 0:
        return b""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, queue)
    data = sock.recv(length, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    if len(data) != length:
        # Never hand over a connection with a hole in what it owes.
        raise RepairError(0, f"queue {queue}: read {len(data)} of {length} bytes")
    return data


def take_over(
    sock: socket.socket, probe: SockProbe, ends: tuple[Endpoint, Endpoint] | None = None
) -> KernelTcpState:
    """Put ``sock`` in repair mode and read its connection (this thread's namespace).

    The socket stays in repair mode: closing it now sends nothing
    (``close_silently``).  Call it from a thread in the socket's network
    namespace (the probe looks the connection up there); needs CAP_NET_ADMIN.
    ``ends``: ``endpoints(sock)`` if the caller has it already.
    """
    local, remote = ends if ends is not None else endpoints(sock)
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, tcp_info.SIZE)
    state, _ca, _retr, _probes, _backoff, options, wscales, _flags = tcp_info.HEAD.unpack_from(info)
    if state not in (TCP_ESTABLISHED, TCP_CLOSE_WAIT):
        raise RepairError(0, f"connection in TCP state {state}: only ESTABLISHED or CLOSE_WAIT")
    rtt_us, rttvar_us, ssthresh, cwnd = tcp_info.METRICS.unpack_from(info, tcp_info.METRICS_AT)
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    outq = _ioctl_int(sock, termios.TIOCOUTQ)
    inq = _ioctl_int(sock, termios.FIONREAD)
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
    snd_nxt = _u32(sock, TCP_QUEUE_SEQ)
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
    rcv_nxt = _u32(sock, TCP_QUEUE_SEQ)
    snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup = struct.unpack(
        "5I", sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, 20)
    )
    ts_now = _u32(sock, TCP_TIMESTAMP)
    unacked = _peek_queue(sock, TCP_SEND_QUEUE, outq)
    unread = _peek_queue(sock, TCP_RECV_QUEUE, inq)
    # Until it is closed, the socket's own timers still run: with the send
    # queue selected, what a loss probe would transmit as new data is only
    # marked sent (tcp_write_xmit skips the wire in repair mode then).
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
    probed = probe.read(local, remote)
    if probed is None:
        raise RepairError(0, "the probe found no such connection in this namespace")
    snd_una = (snd_nxt - outq) & 0xFFFFFFFF
    if (probed.rcv_nxt, probed.snd_una, probed.write_seq) != (rcv_nxt, snd_una, snd_nxt):
        # Both read the same struct: a mismatch means segments still reach the socket.
        raise RepairError(0, "the connection moved while it was read: is it still live?")
    return KernelTcpState(
        local=local,
        remote=remote,
        snd_una=snd_una,
        snd_nxt=snd_nxt,
        rcv_nxt=rcv_nxt,
        unacked=unacked,
        unread=unread,
        fin_received=state == TCP_CLOSE_WAIT,
        snd_wnd=snd_wnd,
        snd_wl1=snd_wl1,
        rcv_wnd=rcv_wnd,
        rcv_wup=rcv_wup,
        max_window=max_window,
        ts_ok=bool(options & TCPI_OPT_TIMESTAMPS),
        ts_now=ts_now,
        ts_recent=probed.ts_recent,
        sack_ok=bool(options & TCPI_OPT_SACK),
        wscale_ok=bool(options & TCPI_OPT_WSCALE),
        snd_wscale=wscales & 0x0F,
        rcv_wscale=wscales >> 4,
        ecn_ok=bool(options & TCPI_OPT_ECN),
        peer_mss=probed.mss_clamp,
        sent=min((probed.snd_nxt - snd_una) & 0xFFFFFFFF, outq),
        srtt=rtt_us / 1e6 if rtt_us else None,
        rttvar=rttvar_us / 1e6,
        snd_cwnd=cwnd,
        snd_ssthresh=None if ssthresh >= TCP_INFINITE_SSTHRESH else ssthresh,
        flow_label=_flow_label(sock, probed.txhash) if len(local[0]) == 16 else None,
    )


def _flow_label(sock: socket.socket, txhash: int) -> int:
    """The flow label Linux puts on this IPv6 socket's packets (0: none).

    Automatic labels (``IPV6_AUTOFLOWLABEL``, the namespace's default) come
    from the socket's ``sk_txhash`` (``flowlabel.kernel_flow_label``); a
    socket without them sends 0.  (A label the application set itself with
    ``IPV6_FLOWINFO_SEND`` is not read: the daemon's own then replaces it.)
    """
    try:
        auto = sock.getsockopt(socket.IPPROTO_IPV6, IPV6_AUTOFLOWLABEL)
    except OSError:
        auto = 1
    if not auto:
        return 0
    try:
        state_ranges = Path("/proc/sys/net/ipv6/flowlabel_state_ranges").read_text().strip() == "1"
    except OSError:
        state_ranges = False
    return kernel_flow_label(txhash, state_ranges)


def endpoints(sock: socket.socket) -> tuple[Endpoint, Endpoint]:
    """(local, remote) of a connected TCP socket, addresses packed (IPv4-mapped: IPv4)."""
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise RepairError(0, "not a TCP socket")
    try:
        return _endpoint(sock.getsockname()), _endpoint(sock.getpeername())
    except OSError as exc:
        raise RepairError(exc.errno, f"not connected: {exc.strerror}") from None


def forward_unread(client: socket.socket, server: socket.socket) -> int:
    """Send what ``client`` received and nobody read on through ``server``; bytes moved.

    Only once the client's segments are held (its receive queue is final).
    Each chunk is peeked, sent, and consumed only as far as the server socket
    took it, so a send that fails or is short loses nothing: the rest stays
    in the client's queue, where ``take_over`` finds it.  A FIN stays too.
    """
    # The proxy may have left Nagle on; these bytes must not wait for an ACK.
    server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    moved = 0
    while True:
        # Asked first: a peek of FORWARD_CHUNK allocates that much whatever is
        # queued (15 us against 3 for the ~80 bytes of a request, measured).
        queued = _ioctl_int(client, termios.FIONREAD)
        if queued == 0:
            return moved  # nothing, or only a FIN: the take-over reads CLOSE_WAIT
        try:
            data = client.recv(min(queued, FORWARD_CHUNK), socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return moved
        if not data:
            return moved
        try:
            sent = server.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except BlockingIOError:
            return moved
        taken = client.recv(sent, socket.MSG_DONTWAIT)
        if len(taken) != sent:  # cannot happen: the bytes were peeked from this queue
            raise RepairError(0, f"consumed {len(taken)} of {sent} forwarded bytes")
        moved += sent
        if sent < len(data):
            return moved


def hold_port(sock: socket.socket) -> socket.socket:
    """A socket bound to ``sock``'s local address and port, so connect() picks other ports.

    Linux's ephemeral port choice (``__inet_hash_connect``) skips a port
    whose bind bucket a bind() made reusable-checked (``fastreuse >= 0``);
    a bucket made by connect() is not, so once ``sock`` is gone its port
    would be the next connect()'s to take.  ``sock`` itself cannot be the
    hold: a repair-mode socket kept open still retransmits what it had in
    flight when its RTO fires.  Binding beside the live ``sock`` takes
    SO_REUSEPORT on both (same user); the hold's own bind, without
    SO_REUSEADDR, sets the bucket's ``fastreuse`` to 0, which outlives
    ``sock``.
    """
    local = sock.getsockname()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    hold = socket.socket(sock.family, socket.SOCK_STREAM)
    try:
        hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        hold.bind(local)
    except OSError:
        hold.close()
        raise
    return hold


def bind_port(local: Endpoint) -> socket.socket:
    """A socket bound to ``local`` (address, port), without SO_REUSEADDR: a port hold.

    For a port no socket has any more: a taken-over connection's after
    ``close_silently`` (its bind bucket went with the disconnect), or an
    adopted splice's, whose hold died with the daemon that made it.  Such
    a bind keeps connect() off the port, as ``hold_port``'s does.
    """
    family = socket.AF_INET6 if len(local[0]) == 16 else socket.AF_INET
    hold = socket.socket(family, socket.SOCK_STREAM)
    try:
        hold.bind((socket.inet_ntop(family, local[0]), local[1]))
    except OSError:
        hold.close()
        raise
    return hold


def give_back(sock: socket.socket) -> None:
    """Leave repair mode: the socket is an ordinary one again (a take-over that failed)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 0)


def close_silently(sock: socket.socket) -> None:
    """End ``sock``'s connection here without a FIN or a RST: it lives on elsewhere.

    Closing this descriptor is not enough while another one holds the
    socket (the proxy's, until it closes it after the reply: milliseconds
    under load): the socket's timers keep running, and a retransmission
    timer or loss probe that fires transmits even in repair mode
    (tcp_retransmit_skb does not look at it).  A capture showed a segment
    resent 4.7 ms after the take-over, when the spliced connection had
    already ended, with the socket's TSval, and the client's RST.  So the
    socket is disconnected first (connect() to AF_UNSPEC): in repair mode
    tcp_disconnect sends nothing, stops the timers, drops the queues and
    leaves the socket CLOSED, whoever closes the last descriptor.
    """
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    try:
        _disconnect(sock)
    finally:
        sock.close()


_AF_UNSPEC_ADDR = bytes(16)  # sa_family 0 (AF_UNSPEC), the rest ignored
_libc = ctypes.CDLL(None, use_errno=True)


def _disconnect(sock: socket.socket) -> None:
    """connect(fd, {AF_UNSPEC}): Python's connect() takes only the socket's own family."""
    if _libc.connect(sock.fileno(), _AF_UNSPEC_ADDR, len(_AF_UNSPEC_ADDR)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"disconnect: {os.strerror(err)}")
