"""NFQUEUE client over a raw NETLINK_NETFILTER socket, in pure Python.

Theory of operation
-------------------
An iptables rule with the NFQUEUE target hands each matching packet to
the ``nfnetlink_queue`` subsystem, which parks it in the kernel and sends a
copy to the userspace socket bound to that queue number (queues are per
network namespace).  Userspace answers with a verdict naming the packet id;
verdicts may come in any order, so a delay line is just "answer later".

Every message is a netlink header (``struct nlmsghdr``, host byte order)
followed by ``struct nfgenmsg`` (family, version, queue number in network
byte order) and a list of netlink attributes (``struct nlattr``: u16 length,
u16 type, value, padded to 4 bytes).  Attribute *values* of nfnetlink_queue
are big-endian.  The layouts are those of
``include/uapi/linux/netfilter/nfnetlink_queue.h``.

This module has two halves: sans-I/O builders/parsers (golden-byte tested),
and :class:`NfqueueSocket`, a thin wrapper that owns the netlink socket.

We never set ``NFQA_CFG_F_GSO``: without it the kernel segments GSO packets
before queueing them, so every queued packet is one MTU-sized frame, as on a
real link.  The kernel also completes CHECKSUM_PARTIAL checksums before
queueing, so what we see (and mangle) carries real checksums.
"""

from __future__ import annotations

import enum
import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NETLINK_NETFILTER = 12
SO_RCVBUFFORCE = 33  # asm-generic/socket.h; the socket module lacks it

# Netlink header flags and control message types (linux/netlink.h).
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3

# nfnetlink: the subsystem id sits in the high byte of nlmsg_type.
NFNL_SUBSYS_QUEUE = 3
NFNETLINK_V0 = 0

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid (host order)
_NFGENMSG = struct.Struct("!BBH")  # family, version, res_id (network order)
_NLATTR = struct.Struct("=HH")  # len, type (host order)
_NLA_TYPE_MASK = 0x3FFF  # strips NLA_F_NESTED and NLA_F_NET_BYTEORDER

_PACKET_HDR = struct.Struct("!IHB")  # packet_id, hw_protocol, hook (packed: 7 bytes)
_VERDICT_HDR = struct.Struct("!II")  # verdict, id
_CFG_CMD = struct.Struct("!BxH")  # command, pad, pf
_CFG_PARAMS = struct.Struct("!IB")  # copy_range, copy_mode (packed: 5 bytes)
_BE32 = struct.Struct("!I")
_HW = struct.Struct("!Hxx8s")  # hw_addrlen, pad, hw_addr[8]


class MsgType(enum.IntEnum):
    """nfnetlink_queue message types (``enum nfqnl_msg_types``)."""

    PACKET = 0
    VERDICT = 1
    CONFIG = 2
    VERDICT_BATCH = 3


class Attr(enum.IntEnum):
    """Packet/verdict attributes (``enum nfqnl_attr_type``)."""

    PACKET_HDR = 1
    VERDICT_HDR = 2
    MARK = 3
    TIMESTAMP = 4
    IFINDEX_INDEV = 5
    IFINDEX_OUTDEV = 6
    IFINDEX_PHYSINDEV = 7
    IFINDEX_PHYSOUTDEV = 8
    HWADDR = 9
    PAYLOAD = 10
    CT = 11
    CT_INFO = 12
    CAP_LEN = 13
    SKB_INFO = 14


class CfgAttr(enum.IntEnum):
    """Config attributes (``enum nfqnl_attr_config``)."""

    CMD = 1
    PARAMS = 2
    QUEUE_MAXLEN = 3
    MASK = 4
    FLAGS = 5


class CfgCmd(enum.IntEnum):
    """Config commands (``enum nfqnl_msg_config_cmds``)."""

    NONE = 0
    BIND = 1
    UNBIND = 2
    PF_BIND = 3
    PF_UNBIND = 4


class CopyMode(enum.IntEnum):
    NONE = 0
    META = 1
    PACKET = 2


class CfgFlag(enum.IntFlag):
    FAIL_OPEN = 0x01
    CONNTRACK = 0x02
    GSO = 0x04
    UID_GID = 0x08
    SECCTX = 0x10


NO_FLAGS = CfgFlag(0)


class Verdict(enum.IntEnum):
    """Netfilter verdicts (linux/netfilter.h)."""

    DROP = 0
    ACCEPT = 1


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _attr(attr_type: int, value: bytes) -> bytes:
    length = _NLATTR.size + len(value)
    pad = _align4(length) - length
    return _NLATTR.pack(length, attr_type) + value + b"\0" * pad


def _message(msg_type: MsgType, queue: int, attrs: bytes, *, flags: int, seq: int) -> bytes:
    body = _NFGENMSG.pack(socket.AF_UNSPEC, NFNETLINK_V0, queue) + attrs
    header = _NLMSGHDR.pack(
        _NLMSGHDR.size + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg_type, flags, seq, 0
    )
    return header + body


def build_config(
    queue: int,
    *,
    command: CfgCmd | None = None,
    copy_mode: CopyMode | None = None,
    copy_range: int = 0xFFFF,
    maxlen: int | None = None,
    flags: CfgFlag | None = None,
    flags_mask: CfgFlag | None = None,
    seq: int = 0,
    ack: bool = True,
) -> bytes:
    """A NFQNL_MSG_CONFIG message carrying any subset of the config attributes.

    The kernel applies the command first, then params, maxlen and flags, so
    one message can bind a queue and configure it.  ``flags_mask`` says which
    flag bits ``flags`` sets or clears (defaults to the bits given).
    """
    attrs = b""
    if command is not None:
        # pf is ignored by kernels since 3.8; libnetfilter_queue sends 0 too.
        attrs += _attr(CfgAttr.CMD, _CFG_CMD.pack(command, 0))
    if copy_mode is not None:
        attrs += _attr(CfgAttr.PARAMS, _CFG_PARAMS.pack(copy_range, copy_mode))
    if maxlen is not None:
        attrs += _attr(CfgAttr.QUEUE_MAXLEN, _BE32.pack(maxlen))
    if flags is not None:
        mask = flags if flags_mask is None else flags_mask
        attrs += _attr(CfgAttr.FLAGS, _BE32.pack(flags))
        attrs += _attr(CfgAttr.MASK, _BE32.pack(mask))
    nl_flags = NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
    return _message(MsgType.CONFIG, queue, attrs, flags=nl_flags, seq=seq)


def build_verdict(
    queue: int,
    packet_id: int,
    verdict: Verdict,
    payload: bytes | None = None,
    *,
    seq: int = 0,
) -> bytes:
    """A NFQNL_MSG_VERDICT for one packet, optionally replacing its payload.

    A replacement payload starts at the network header, like the queued one;
    the kernel trims or extends the skb to its length.
    """
    attrs = _attr(Attr.VERDICT_HDR, _VERDICT_HDR.pack(verdict, packet_id))
    if payload is not None:
        attrs += _attr(Attr.PAYLOAD, payload)
    return _message(MsgType.VERDICT, queue, attrs, flags=NLM_F_REQUEST, seq=seq)


@dataclass(frozen=True, slots=True)
class QueuedPacket:
    """One NFQNL_MSG_PACKET: a packet the kernel holds until our verdict."""

    queue: int
    packet_id: int
    hw_protocol: int
    hook: int
    payload: bytes
    indev: int = 0
    outdev: int = 0
    physindev: int = 0
    physoutdev: int = 0
    hwaddr: bytes = b""
    mark: int = 0


@dataclass(frozen=True, slots=True)
class NetlinkAck:
    """NLMSG_ERROR: ``error`` 0 is an ACK, otherwise a negative errno."""

    seq: int
    error: int


@dataclass(frozen=True, slots=True)
class Malformed:
    """Input we could not parse; the reason names what was wrong."""

    reason: str


Message = QueuedPacket | NetlinkAck | Malformed


def _parse_attrs(data: memoryview) -> dict[int, memoryview] | str:
    attrs: dict[int, memoryview] = {}
    off = 0
    while off + _NLATTR.size <= len(data):
        length, attr_type = _NLATTR.unpack_from(data, off)
        if length < _NLATTR.size or off + length > len(data):
            return f"attribute type {attr_type} has bad length {length}"
        attrs[attr_type & _NLA_TYPE_MASK] = data[off + _NLATTR.size : off + length]
        off += _align4(length)
    return attrs


def _be32_attr(attrs: dict[int, memoryview], attr: Attr) -> int:
    value = attrs.get(attr)
    if value is None or len(value) < 4:
        return 0
    return int(_BE32.unpack_from(value)[0])


def parse_packet(queue: int, body: memoryview) -> QueuedPacket | Malformed:
    """Parse the attributes of a NFQNL_MSG_PACKET (after the nfgenmsg)."""
    attrs = _parse_attrs(body)
    if isinstance(attrs, str):
        return Malformed(attrs)
    hdr = attrs.get(Attr.PACKET_HDR)
    if hdr is None or len(hdr) < _PACKET_HDR.size:
        return Malformed("packet message without NFQA_PACKET_HDR")
    packet_id, hw_protocol, hook = _PACKET_HDR.unpack_from(hdr)
    hwaddr = b""
    hw = attrs.get(Attr.HWADDR)
    if hw is not None and len(hw) >= _HW.size:
        addrlen, addr = _HW.unpack_from(hw)
        hwaddr = addr[: min(addrlen, 8)]
    payload = attrs.get(Attr.PAYLOAD)
    return QueuedPacket(
        queue=queue,
        packet_id=packet_id,
        hw_protocol=hw_protocol,
        hook=hook,
        payload=b"" if payload is None else bytes(payload),
        indev=_be32_attr(attrs, Attr.IFINDEX_INDEV),
        outdev=_be32_attr(attrs, Attr.IFINDEX_OUTDEV),
        physindev=_be32_attr(attrs, Attr.IFINDEX_PHYSINDEV),
        physoutdev=_be32_attr(attrs, Attr.IFINDEX_PHYSOUTDEV),
        hwaddr=hwaddr,
        mark=_be32_attr(attrs, Attr.MARK),
    )


def parse_messages(data: bytes | memoryview) -> Iterator[Message]:
    """Split one netlink datagram into messages; bad input yields Malformed."""
    view = memoryview(data)
    off = 0
    while off + _NLMSGHDR.size <= len(view):
        length, msg_type, _flags, seq, _pid = _NLMSGHDR.unpack_from(view, off)
        if length < _NLMSGHDR.size or off + length > len(view):
            yield Malformed(f"netlink message length {length} at offset {off}")
            return
        body = view[off + _NLMSGHDR.size : off + length]
        off += _align4(length)
        if msg_type == NLMSG_ERROR:
            if len(body) < 4:
                yield Malformed("short NLMSG_ERROR")
                continue
            yield NetlinkAck(seq=seq, error=struct.unpack_from("=i", body)[0])
        elif msg_type == NLMSG_DONE:
            continue
        elif msg_type == (NFNL_SUBSYS_QUEUE << 8) | MsgType.PACKET:
            if len(body) < _NFGENMSG.size:
                yield Malformed("packet message without nfgenmsg")
                continue
            _family, _version, queue = _NFGENMSG.unpack_from(body)
            yield parse_packet(queue, body[_NFGENMSG.size :])
        else:
            yield Malformed(f"unexpected netlink message type {msg_type:#x}")


class NfqueueError(OSError):
    """The kernel refused a queue configuration request."""


class NfqueueSocket:
    """The I/O shell: a netlink socket bound to one queue.

    ``receive()`` drains every datagram that is ready (each queued packet is
    its own datagram), so one wakeup of the event loop handles a burst.  If
    the socket buffer overflows the kernel reports ENOBUFS once; the packets
    it could not deliver were already dropped by the kernel (no FAIL_OPEN), so
    we count the event and carry on.
    """

    def __init__(
        self,
        queue: int,
        *,
        copy_range: int = 0xFFFF,
        maxlen: int = 4096,
        rcvbuf: int = 16 << 20,
        flags: CfgFlag = NO_FLAGS,
    ) -> None:
        self.queue = queue
        self.enobufs = 0
        self.errors = 0  # error replies, e.g. a verdict for a packet already gone
        self._seq = 0
        self._buf = bytearray(0x10000 + 4096)
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            try:
                # SO_RCVBUFFORCE (root) goes past net.core.rmem_max.
                self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except PermissionError:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self._sock.bind((0, 0))
            self._request(build_config(queue, command=CfgCmd.BIND, seq=self._next_seq()))
            self._request(
                build_config(
                    queue,
                    copy_mode=CopyMode.PACKET,
                    copy_range=copy_range,
                    maxlen=maxlen,
                    # GSO deliberately cleared: see the module docstring.
                    flags=flags & ~CfgFlag.GSO,
                    flags_mask=flags | CfgFlag.GSO | CfgFlag.FAIL_OPEN,
                    seq=self._next_seq(),
                )
            )
        except BaseException:
            self._sock.close()
            raise
        self._sock.setblocking(False)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _request(self, msg: bytes) -> None:
        """Send a config request and wait for its ACK (blocking)."""
        seq = _NLMSGHDR.unpack_from(msg)[3]
        self._sock.send(msg)
        while True:
            n = self._sock.recv_into(self._buf)
            for m in parse_messages(memoryview(self._buf)[:n]):
                if isinstance(m, NetlinkAck) and m.seq == seq:
                    if m.error != 0:
                        raise NfqueueError(
                            -m.error, f"nfqueue {self.queue} config: {os.strerror(-m.error)}"
                        )
                    return

    def fileno(self) -> int:
        return self._sock.fileno()

    def receive(self, limit: int = 256) -> list[QueuedPacket]:
        """Every queued packet ready now (up to ``limit`` datagrams)."""
        packets: list[QueuedPacket] = []
        for _ in range(limit):
            try:
                n = self._sock.recv_into(self._buf)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.enobufs += 1
                    continue
                raise
            for m in parse_messages(memoryview(self._buf)[:n]):
                if isinstance(m, QueuedPacket):
                    packets.append(m)
                elif (isinstance(m, NetlinkAck) and m.error != 0) or isinstance(m, Malformed):
                    self.errors += 1
        return packets

    def send(self, messages: list[bytes]) -> None:
        """Send verdicts; the kernel walks every nlmsg in one datagram."""
        if not messages:
            return
        chunk: list[bytes] = []
        size = 0
        for msg in messages:
            # Keep datagrams well below the socket's send buffer.
            if size + len(msg) > 256 << 10 and chunk:
                self._sock.send(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(msg)
            size += len(msg)
        self._sock.send(b"".join(chunk))

    def close(self) -> None:
        try:
            self._sock.setblocking(True)
            self._sock.send(build_config(self.queue, command=CfgCmd.UNBIND, ack=False))
        except OSError:
            pass
        self._sock.close()

    def __enter__(self) -> NfqueueSocket:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
