"""The fast path's map layout in Python: ctypes mirrors of splice_map.h.

The map is the interface between the daemon and the tc program (STYLE.md,
libbpf-bootstrap): the daemon encodes each direction of a splice, a
``Translator`` (thesis 5.2-5.4), into one ``SpliceXlate``; the program only
applies it.  Every Structure here mirrors the C struct of the same name in
splice_map.h field for field; tests/test_fastpath.py compiles the header
with gcc and compares sizes and offsets, so a change to one side that is
not made to the other fails a test instead of corrupting a map.

Byte order follows the header: addresses and ports are stored in network
order (the program copies them into the packet as they are), every other
number in host order (the program does arithmetic on them).
"""

from __future__ import annotations

import ctypes
import struct

from daemon.splice.family import V6_PLACEHOLDER
from daemon.splice.state import Iface, SpliceState
from daemon.splice.translator import Translator, TsMode

__all__ = [
    "AF_INET",
    "AF_INET6",
    "MAX_FLOWS_DEFAULT",
    "TS_ABSENT",
    "TS_MAP",
    "TS_STRIP",
    "FlowKey",
    "SpliceCount",
    "SpliceKey",
    "SpliceStats",
    "SpliceXlate",
    "decode",
    "decode_key",
    "encode",
    "encode_key",
    "family_of",
    "hold_entry",
    "reverse_key",
    "state_code",
]

MAX_FLOWS_DEFAULT = 131072  # SPLICE_MAX_FLOWS_DEFAULT
TS_ABSENT = 0
TS_MAP = 1
TS_STRIP = 2
AF_INET = 4  # SPLICE_AF_INET
AF_INET6 = 6  # SPLICE_AF_INET6
_FAMILY_OF_LEN = {4: AF_INET, 16: AF_INET6}
_LEN_OF_FAMILY = {family: n for n, family in _FAMILY_OF_LEN.items()}
_TS_CODE = {TsMode.ABSENT: TS_ABSENT, TsMode.MAP: TS_MAP, TsMode.STRIP: TS_STRIP}
_TS_MODE = {code: mode for mode, code in _TS_CODE.items()}
# side and state (SPLICE_SIDE_*, SPLICE_STATE_*): the daemon's notes for a
# daemon that adopts the entry after a restart; the program never reads them.
SIDE_CODE = {Iface.CLIENT: 0, Iface.SERVER: 1}
SIDE_OF_CODE = {code: iface for iface, code in SIDE_CODE.items()}
STATE_OTHER = 255
_STATE_CODE = {SpliceState.SPLICED: 0, SpliceState.FIN_RELAYED: 1, SpliceState.SHUTDOWN: 2}
STATE_OF_CODE = {code: state for state, code in _STATE_CODE.items()}
_M32 = 0xFFFFFFFF

# (saddr, sport, daddr, dport) of the *incoming* packet, addresses as 4 bytes.
FlowKey = tuple[bytes, int, bytes, int]


class SpliceKey(ctypes.Structure):
    """``struct splice_key``: the incoming packet's 4-tuple, network order, and family."""

    _fields_ = [
        ("saddr", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
        ("sport", ctypes.c_uint8 * 2),
        ("dport", ctypes.c_uint8 * 2),
        ("family", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8 * 3),
    ]


class SpliceXlate(ctypes.Structure):
    """``struct splice_xlate``: one direction of one splice."""

    _fields_ = [
        ("saddr", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
        ("sport", ctypes.c_uint8 * 2),
        ("dport", ctypes.c_uint8 * 2),
        ("seq_delta", ctypes.c_uint32),
        ("ack_delta", ctypes.c_uint32),
        ("tsval_delta", ctypes.c_uint32),
        ("tsecr_delta", ctypes.c_uint32),
        ("tsecr_floor_in", ctypes.c_uint32),
        ("tsecr_floor_out", ctypes.c_uint32),
        ("fin_ack", ctypes.c_uint32),
        ("egress_ifindex", ctypes.c_uint32),
        ("out_mss", ctypes.c_uint16),
        ("ts_mode", ctypes.c_uint8),
        ("has_tsecr_floor", ctypes.c_uint8),
        ("sack_map", ctypes.c_uint8),
        ("wnd_in_shift", ctypes.c_uint8),
        ("wnd_out_shift", ctypes.c_uint8),
        ("fin_watch", ctypes.c_uint8),
        ("limit_seq", ctypes.c_uint32),
        ("has_limit", ctypes.c_uint8),
        ("side", ctypes.c_uint8),
        ("state", ctypes.c_uint8),
        ("ecn", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("hold", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8 * 2),
        ("flow_label", ctypes.c_uint32),
        ("punt_ifindex", ctypes.c_uint32),
        ("relay_packets", ctypes.c_uint64),
        ("relay_bytes", ctypes.c_uint64),
    ]


class SpliceCount(ctypes.Structure):
    """``struct splice_count``: what the program redirected for one entry (its own map)."""

    _fields_ = [
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
    ]


class SpliceStats(ctypes.Structure):
    """``struct splice_stats``: one CPU's global counters; field names are the API."""

    _fields_ = [
        ("redirected_packets", ctypes.c_uint64),
        ("redirected_bytes", ctypes.c_uint64),
        ("punt_no_flow", ctypes.c_uint64),
        ("punt_flags", ctypes.c_uint64),
        ("punt_ip_options_or_fragment", ctypes.c_uint64),
        ("punt_tcp_options_layout", ctypes.c_uint64),
        ("punt_mss", ctypes.c_uint64),
        ("punt_fin_watch", ctypes.c_uint64),
        ("punt_malformed", ctypes.c_uint64),
        ("dropped_rewrite_failed", ctypes.c_uint64),
        ("punt_limit", ctypes.c_uint64),
        ("punt_mtu", ctypes.c_uint64),
        ("redirected_family_changed", ctypes.c_uint64),
        ("gso_recut", ctypes.c_uint64),
        ("held", ctypes.c_uint64),
        ("punt_redirected", ctypes.c_uint64),
    ]


def _port(value: int) -> ctypes.Array[ctypes.c_uint8]:
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"port {value}")
    return (ctypes.c_uint8 * 2)(value >> 8, value & 0xFF)


def family_of(addr: bytes) -> int:
    """``SPLICE_AF_*`` of an address by its length (4: IPv4, 16: IPv6)."""
    family = _FAMILY_OF_LEN.get(len(addr))
    if family is None:
        raise ValueError(f"an address of {len(addr)} bytes")
    return family


def _addr(value: bytes) -> ctypes.Array[ctypes.c_uint8]:
    # Byte arrays, not c_char: a c_char array stops at the first zero byte.
    # An IPv4 address fills the first 4 bytes; the rest stay zero.
    family_of(value)
    return (ctypes.c_uint8 * 16).from_buffer_copy(value.ljust(16, b"\0"))


def _addr_of(field: ctypes.Array[ctypes.c_uint8], family: int) -> bytes:
    return bytes(field)[: _LEN_OF_FAMILY[family]]


# struct splice_key packed in one step (encode_key runs several times per splice).
_KEY = struct.Struct("!16s16sHHB3x")


def encode_key(key: FlowKey) -> SpliceKey:
    """The map key for packets arriving as ``key`` = (saddr, sport, daddr, dport)."""
    saddr, sport, daddr, dport = key
    family = family_of(saddr)
    if family_of(daddr) != family:
        raise ValueError("a key's addresses of two families")
    if not (0 <= sport <= 0xFFFF and 0 <= dport <= 0xFFFF):
        raise ValueError(f"ports {sport}, {dport}")
    # "16s" zero-fills: an IPv4 address fills the first 4 bytes, as in _addr.
    return SpliceKey.from_buffer_copy(_KEY.pack(saddr, daddr, sport, dport, family))


def state_code(state: SpliceState) -> int:
    """``SPLICE_STATE_*`` of a Fig. 5.1 state (TIMEWAIT is both sides SHUTDOWN)."""
    if state is SpliceState.TIMEWAIT:
        return _STATE_CODE[SpliceState.SHUTDOWN]
    return _STATE_CODE.get(state, STATE_OTHER)


def encode(
    t: Translator,
    egress_ifindex: int,
    limit: int | None = None,
    fin_ack: int | None = None,
    side: Iface = Iface.CLIENT,
    state: SpliceState = SpliceState.SPLICED,
    out: tuple[bytes, bytes] | None = None,
    punt_ifindex: int = 0,
) -> SpliceXlate:
    """The map value that makes the program do what ``translate(t, ...)`` does.

    Only a fully spliced direction can be offloaded: with ``ack_delta`` None
    every segment carries the daemon's fixed ACK (thesis Fig. 5.1,
    PRE_SPLICED), which is the daemon's business.  The relay's share starts at zero.
    ``limit``: a bounded splice's limit in the input sequence space (the
    program relays only what lies wholly before it); ``fin_ack``: the ACK
    to pass up from the start (``FastPath.watch_fin_ack``); ``side`` and
    ``state``: the connection these segments arrive on and its Fig. 5.1
    state, for adoption after a restart (the program ignores them).
    ``punt_ifindex``: where what the entry punts goes instead of the
    kernel (``hold_entry``); 0: the kernel.
    """
    if t.ack_delta is None:
        raise ValueError("the reverse direction is not spliced yet (ack_delta is None)")
    src, dst = out if out is not None else (t.src_addr, t.dst_addr)
    family = family_of(src)
    if family_of(dst) != family:
        raise ValueError("an output connection's addresses of two families")
    floor = t.tsecr_floor_in
    return SpliceXlate(
        saddr=_addr(src),
        daddr=_addr(dst),
        sport=_port(t.src_port),
        dport=_port(t.dst_port),
        seq_delta=t.seq_delta & _M32,
        ack_delta=t.ack_delta & _M32,
        tsval_delta=t.tsval_delta & _M32,
        tsecr_delta=t.tsecr_delta & _M32,
        tsecr_floor_in=(floor or 0) & _M32,
        tsecr_floor_out=t.tsecr_floor_out & _M32,
        fin_ack=(fin_ack or 0) & _M32,
        egress_ifindex=egress_ifindex,
        out_mss=t.out_mss,
        ts_mode=_TS_CODE[t.ts_mode],
        has_tsecr_floor=floor is not None,
        # translate() maps SACK only with an ack_delta, which is given here.
        sack_map=bool(t.sack),
        wnd_in_shift=t.wnd_in_shift,
        wnd_out_shift=t.wnd_out_shift,
        fin_watch=fin_ack is not None,
        limit_seq=(limit or 0) & _M32,
        has_limit=limit is not None,
        side=SIDE_CODE[side],
        state=state_code(state),
        ecn=t.ecn,
        family=family,
        flow_label=t.flow_label if family == AF_INET6 else 0,
        punt_ifindex=punt_ifindex,
    )


def hold_entry(family: int, punt_ifindex: int) -> SpliceXlate:
    """An entry that relays nothing and sends every segment to ``punt_ifindex``.

    For a kernel connection being taken over (daemon/io/repair.py): from
    the moment it is in the map until its real translation replaces it,
    its segments reach the daemon's TUN, not the socket being read.
    """
    if family not in _LEN_OF_FAMILY:
        raise ValueError(f"family {family}")
    if punt_ifindex <= 0:
        raise ValueError("a held entry needs an interface to send its segments to")
    return SpliceXlate(family=family, hold=1, punt_ifindex=punt_ifindex)


def _port_of(field: ctypes.Array[ctypes.c_uint8]) -> int:
    return field[0] << 8 | field[1]


def decode_key(k: SpliceKey) -> FlowKey:
    """``encode_key`` reversed."""
    if k.family not in _LEN_OF_FAMILY:
        raise ValueError(f"key family {k.family}")
    return (
        _addr_of(k.saddr, k.family),
        _port_of(k.sport),
        _addr_of(k.daddr, k.family),
        _port_of(k.dport),
    )


def reverse_key(v: SpliceXlate) -> FlowKey:
    """The key of the other direction's entry: ``v``'s output 4-tuple, reversed."""
    if v.family not in _LEN_OF_FAMILY:
        raise ValueError(f"entry family {v.family}")
    return (
        _addr_of(v.daddr, v.family),
        _port_of(v.dport),
        _addr_of(v.saddr, v.family),
        _port_of(v.sport),
    )


def decode(v: SpliceXlate, offload: bool) -> Translator:
    """The Translator ``v`` was encoded from (``encode`` reversed).

    ``ack_fixed`` is not in the map: an installed direction has an
    ``ack_delta``, and ``translate`` uses ``ack_fixed`` only without one.
    ``offload`` is the daemon's TUN mode, not the splice's.  An IPv6
    output connection's addresses become the relay's placeholder (they are
    in the keys: ``reverse_key``).
    """
    if v.ts_mode not in _TS_MODE:
        raise ValueError(f"ts_mode {v.ts_mode}")
    if v.family not in _LEN_OF_FAMILY:
        raise ValueError(f"entry family {v.family}")
    six = v.family == AF_INET6
    return Translator(
        src_addr=V6_PLACEHOLDER if six else _addr_of(v.saddr, v.family),
        dst_addr=V6_PLACEHOLDER if six else _addr_of(v.daddr, v.family),
        src_port=_port_of(v.sport),
        dst_port=_port_of(v.dport),
        seq_delta=v.seq_delta,
        ack_delta=v.ack_delta,
        ack_fixed=0,
        ts_mode=_TS_MODE[v.ts_mode],
        tsval_delta=v.tsval_delta,
        tsecr_delta=v.tsecr_delta,
        sack=bool(v.sack_map),
        wnd_in_shift=v.wnd_in_shift,
        wnd_out_shift=v.wnd_out_shift,
        out_mss=v.out_mss,
        offload=offload,
        tsecr_floor_in=v.tsecr_floor_in if v.has_tsecr_floor else None,
        tsecr_floor_out=v.tsecr_floor_out,
        ecn=bool(v.ecn),
        flow_label=v.flow_label,
    )
