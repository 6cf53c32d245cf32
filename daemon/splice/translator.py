"""The splice translator: rewrite a relayed IPv4/TCP segment in place (thesis 5.2-5.4).

Read first: thesis 5.2 (which header fields change), 5.3 (sequence mapping),
5.4 (options: 5.4.1 timestamps, 5.4.2 window scale, 5.4.3 SACK, 5.4.4 MSS);
RFC 9293 3.1 (header), RFC 7323 (timestamps, window scale), RFC 2018 and
RFC 2883 (SACK, D-SACK), RFC 1624 (incremental checksum), RFC 3168 (ECN);
DESIGN.md "Things that bite" (NEEDS_CSUM partial sums, GSO).

Theory of operation
-------------------
Once two connections are spliced, every segment of one is relayed on the
other.  A ``Translator`` holds everything that is constant for one direction
of one splice (addresses, ports, deltas, option policy), computed once at
splice time by the splice state machine; ``translate`` applies it to one
packet, in the read buffer, touching only headers.

Sequence numbers (5.3).  The bytes a client sends after the splice must
appear on the server connection right after the bytes the daemon's own
endpoint sent there before the splice.  At splice time each side has a
*base point*: the next sequence number the daemon expects from the client
(``splice_irs_client``, its rcv_nxt) and the next one it would send to the
server (``splice_iss_server``, its snd_nxt)::

    client connection (client's sequence space)
        ... bytes the proxy read ...|  bytes relayed from here on
        ----------------------------+--------------------------->
                                    ^ splice_irs_client
                                    |        seq_out = seq_in + seq_delta
                                    v
        ----------------------------+--------------------------->
        ... bytes the proxy wrote ..|  the same bytes, relayed
                                    ^ splice_iss_server
    server connection (daemon's sequence space toward the server)

    seq_delta = splice_iss_server - splice_irs_client          (mod 2**32)

An acknowledgment from the client acknowledges bytes in the daemon's
client-side send space; relayed to the server it must acknowledge the same
bytes in the server's space, so its base points are the other pair:

    ack_delta = splice_irs_server - splice_iss_client          (mod 2**32)

which is minus the reverse direction's seq_delta: the two translators of a
splice are mirror images.  While the reverse direction is not spliced yet
(the peer's interface is PRE_SPLICED, Fig. 5.1) the daemon's endpoint still
owns what the other peer is acknowledged, so ``ack_delta`` is None and every
relayed segment carries the fixed ``ack_fixed``.  SACK blocks (5.4.3, D-SACK
of RFC 2883 included: a block below the ack is still a sequence range) live
in the acknowledgment space and move with ``ack_delta``.

Timestamps (5.4.1) are two more clocks with the same shape: TSval is the
sender's clock, continued on the output connection from the last TSval the
daemon sent there; TSecr echoes the daemon's clock on the input connection
and must echo the output peer's clock instead::

    tsval_delta = last_sentTS(out connection) - ts_recent(in connection)
    tsecr_delta = ts_recent(out connection)   - last_sentTS(in connection)

``base_delta(in_base, out_base)`` computes each of these.  If only the
input connection negotiated timestamps the option is overwritten with NOPs
(``TsMode.STRIP``); if neither did there is nothing to do (``ABSENT``).

Window (5.4.2): a window field from the input peer means ``field <<
wnd_in_shift`` bytes; the output peer reads our field as ``field <<
wnd_out_shift``.  When the shifts differ the window is rescaled,
``(field << in) >> out``, rounded *down* and clamped at 65535: the output
peer is never offered a byte its counterpart did not allow (RFC 7323 2.3
makes the receiver's buffer the limit; a rounded-up window could let the
sender overrun it).  The thesis offered the client scale 0 so that this
translation would never be needed; with a 64 KB window a 20 ms path carries
26 Mbit/s, so both sides get real scales and the translator converts.

MSS (5.4.4): a payload longer than ``out_mss`` is cut, by the kernel (GSO,
offload mode) or here (plain mode, the rare path).

IPv4 (5.2.1): new addresses, TTL 64 (the daemon is an endpoint of both
connections, not a router), IP options removed.

ECN (RFC 3168).  When both connections negotiated ECN (``ecn``), the IP
ECN field and TCP's ECE and CWR pass unchanged: a CE mark one link put on
a data segment reaches the receiver on the other connection, its ECE
reaches the sender, and the sender's CWR ends the echo, as if the two
peers had one connection.  Otherwise the codepoint becomes Not-ECT and
ECE and CWR are cleared: an ECT packet must not reach a peer that never
agreed to ECN (6.1.1.1), and ECE or CWR would mean nothing to it.  The AE
bit (AccECN) is always cleared; neither endpoint of the daemon's
negotiates AccECN.

Checksums.  In offload mode the output always carries NEEDS_CSUM with the
pseudo-header sum in the TCP checksum field: O(1), and it makes any header
rewrite free, whatever the input's checksum state.  In plain mode the input
checksum is complete (the caller verified it) and is updated with RFC 1624
eqn. 3 over the one contiguous region that changes, bytes 12 .. end of TCP
header (the addresses, which are the pseudo-header's, and the TCP header):
sum it before and after the rewrite, with the checksum field holding its
old value both times, and HC' = ~(~HC + ~old + new).  The payload is never
read.

Everything is decided in one pass: one ``struct`` unpack of the IPv4 + TCP
fixed headers, an option scan (fast paths for Linux's NOP NOP TS and NOP NOP
TS NOP NOP SACK layouts, a kind/length scanner otherwise), one ``struct``
pack of both headers, one virtio header.  Measured with
``python -m bench.bench_translator``: about 1.7 us per packet in offload
mode, 64 KB GSO or 1448 B alike; about 2.5 us in plain mode.  Malformed input (lengths,
option lengths, fragments, non-TCP) returns ``[]``: the caller counts it and
drops the packet; the buffer may then have been partly rewritten.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

from daemon.wire.checksum import internet_checksum, ones_complement_sum
from daemon.wire.tcp import ACK, FIN, PSH, URG
from daemon.wire.tcp_options import (
    KIND_EOL,
    KIND_MSS,
    KIND_NOP,
    KIND_SACK,
    KIND_SACK_PERMITTED,
    KIND_TIMESTAMP,
    KIND_WSCALE,
    MAX_SACK_BLOCKS,
)
from daemon.wire.vnet import F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, TCP_CSUM_OFFSET, VnetHeader

__all__ = ["SegmentInfo", "Translator", "TsMode", "base_delta", "peek", "translate"]

_SIGN = 0x80000000  # modulo 2**32, "before" (RFC 7323 5.3 uses the same test for PAWS)
_M32 = 0xFFFFFFFF
_M16 = 0xFFFF
_PROTO_TCP = 6
_TTL = 64
_FRAG_BITS = 0x3FFF  # MF + fragment offset: any fragment
_KEEP_FLAGS = 0x3F  # URG ACK PSH RST SYN FIN: ECE and CWR cleared (RFC 3168 6.1)
_KEEP_FLAGS_ECN = 0xFF  # the same with ECE and CWR, when both sides negotiated ECN
_CWR = 0x80
_NOP_NOP_TS = 0x0101080A  # Linux's data-segment option layout (RFC 7323 appendix A)
_NOPS = bytes([KIND_NOP]) * 40
_NOP10 = _NOPS[:10]

# IPv4 header (ihl 5) then the TCP fixed header: one unpack, one pack.
_IN = struct.Struct("!BBHHHBB10xHHIIBBHHH")  # checksum and addresses skipped
_OUT = struct.Struct("!BBHHHBBH8sHHIIBBHHH")
_IP_HEAD = struct.Struct("!BBHHHBB")
_TCP = struct.Struct("!HHIIBBHHH")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_TS_LAYOUT = struct.Struct("!III")  # NOP NOP kind len, TSval, TSecr
_NOP_NOP_SACK = 0x01010500  # + the SACK option's length
# Data offset -> the SACK blocks after NOP NOP TS NOP NOP SACK (1 to 3 blocks).
_SACK_BLOCKS = {36 + 8 * k: struct.Struct("!" + "II" * k) for k in (1, 2, 3)}
_U32X2 = struct.Struct("!II")
_VNET = struct.Struct("<BBHHHH")  # daemon.wire.vnet's layout, packed without an object

_FIXED_LEN = {KIND_MSS: 4, KIND_WSCALE: 3, KIND_SACK_PERMITTED: 2}


class TsMode(Enum):
    """What to do with the timestamp option of a relayed segment (5.4.1)."""

    MAP = "map"  # both connections use timestamps: add the deltas
    STRIP = "strip"  # only the input connection does: overwrite the option with NOPs
    ABSENT = "absent"  # neither does: leave the options alone


def base_delta(in_base: int, out_base: int) -> int:
    """The delta that maps ``in_base`` onto ``out_base`` in a 32-bit space (5.3)."""
    return (out_base - in_base) & _M32


@dataclass(frozen=True, slots=True)
class Translator:
    """The precomputed rewrite for one direction of one splice.

    ``src_addr``/``src_port`` are the daemon's endpoint on the output
    connection, ``dst_addr``/``dst_port`` that connection's peer.  Deltas
    may be given negative or unreduced; they are applied modulo 2**32.
    """

    src_addr: bytes
    dst_addr: bytes
    src_port: int
    dst_port: int
    seq_delta: int
    ack_delta: int | None
    ack_fixed: int
    ts_mode: TsMode
    tsval_delta: int
    tsecr_delta: int
    sack: bool
    wnd_in_shift: int
    wnd_out_shift: int
    out_mss: int
    offload: bool
    # TSecr values older than ``tsecr_floor_in`` echo a TSval of the *input*
    # connection's own TCB (sent before the splice), which has no image in
    # the output connection's clock: they become ``tsecr_floor_out``, the
    # newest TSval the output peer really sent (its ts_recent at splice
    # time), so every TSecr on a link echoes a TSval of that link.
    tsecr_floor_in: int | None = None
    tsecr_floor_out: int = 0
    # Both connections negotiated ECN: the IP ECN field, ECE and CWR pass.
    ecn: bool = False
    # An IPv6 output connection's flow label (RFC 6437; 0 for IPv4). Not
    # used by translate(): the IPv6 header is written after it (family.py,
    # the fast path's program), but it travels with the translation so that
    # a splice adopted from the kernel's map keeps its connection's label.
    flow_label: int = 0
    # Derived once here so that translate() does no per-packet work for them.
    _addrs: bytes = field(init=False, repr=False, compare=False)
    _ip_base: int = field(init=False, repr=False, compare=False)
    _pseudo_base: int = field(init=False, repr=False, compare=False)
    _ts_map: bool = field(init=False, repr=False, compare=False)
    _ts_strip: bool = field(init=False, repr=False, compare=False)
    _sack_map: bool = field(init=False, repr=False, compare=False)
    _sack_delta: int = field(init=False, repr=False, compare=False)
    _tos_mask: int = field(init=False, repr=False, compare=False)
    _flag_mask: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.src_addr) != 4 or len(self.dst_addr) != 4:
            raise ValueError("Translator: IPv4 addresses are 4 bytes")
        for port in (self.src_port, self.dst_port):
            if not 0 <= port <= _M16:
                raise ValueError(f"Translator: port {port}")
        for shift in (self.wnd_in_shift, self.wnd_out_shift):
            if not 0 <= shift <= 14:  # RFC 7323 2.3
                raise ValueError(f"Translator: window shift {shift}")
        if not 1 <= self.out_mss <= _M16:
            raise ValueError(f"Translator: out_mss {self.out_mss}")
        addrs = self.src_addr + self.dst_addr
        addr_sum = ones_complement_sum(addrs)
        setattr_ = object.__setattr__
        setattr_(self, "_addrs", addrs)
        # IPv4 header words that never change: TTL|protocol and the addresses.
        setattr_(self, "_ip_base", (_TTL << 8 | _PROTO_TCP) + addr_sum)
        # TCP pseudo-header minus its length word (RFC 9293 3.1).
        setattr_(self, "_pseudo_base", addr_sum + _PROTO_TCP)
        setattr_(self, "_ts_map", self.ts_mode is TsMode.MAP)
        setattr_(self, "_ts_strip", self.ts_mode is TsMode.STRIP)
        # SACK blocks are acknowledgment-space numbers: without ack_delta
        # there is no mapping for them, so they go (5.4.3).
        setattr_(self, "_sack_map", self.sack and self.ack_delta is not None)
        setattr_(self, "_sack_delta", self.ack_delta or 0)
        setattr_(self, "_tos_mask", 0xFF if self.ecn else 0xFC)  # else Not-ECT
        setattr_(self, "_flag_mask", _KEEP_FLAGS_ECN if self.ecn else _KEEP_FLAGS)


class SegmentInfo(NamedTuple):
    """The fixed-offset fields of an IPv4/TCP packet, from one unpack (a tuple: cheap)."""

    ip_header_len: int
    tcp_header_len: int
    flags: int
    seq: int
    ack: int
    window: int
    payload_len: int
    src_port: int
    dst_port: int
    tos: int
    total: int
    ident: int
    frag: int
    offset_byte: int  # data offset and the reserved/AE bits
    checksum: int
    urgent: int


def peek(packet: memoryview) -> SegmentInfo | None:
    """The header fields of an IPv4/TCP packet, or None if it is not a well-formed one.

    Checks lengths, version, protocol and that it is not a fragment; does not
    verify checksums or parse options.  ``translate`` takes the result, so
    a relayed packet's headers are unpacked once.
    """
    n = len(packet)
    if n < 40:
        return None
    (vihl, tos, total, ident, ff, _ttl, proto, sport, dport, seq, ack, off, flags, window, csum,
     urg) = _IN.unpack_from(packet)  # fmt: skip
    if proto != _PROTO_TCP or ff & _FRAG_BITS or total > n:
        return None
    ihl = 20
    if vihl != 0x45:
        ihl = (vihl & 0x0F) * 4
        if vihl >> 4 != 4 or ihl < 20 or total < ihl + 20:
            return None
        sport, dport, seq, ack, off, flags, window, csum, urg = _TCP.unpack_from(packet, ihl)
    doff = (off >> 4) * 4
    if doff < 20 or ihl + doff > total:
        return None
    return SegmentInfo(
        ihl, doff, flags, seq, ack, window, total - ihl - doff, sport, dport,
        tos, total, ident, ff, off, csum, urg,
    )  # fmt: skip


def translate(
    t: Translator,
    vnet: VnetHeader | None,
    packet: memoryview,
    info: SegmentInfo | None = None,
) -> list[tuple[bytes | None, memoryview | bytearray]]:
    """Rewrite ``packet`` in place for the output connection; return what to write.

    ``packet`` is a writable view of one IPv4 packet (it may extend past the
    total length: the rest is ignored), ``vnet`` its virtio_net_hdr in
    offload mode and ``info`` what ``peek`` said of it (peeked here if not
    given).  Returns ``(vnet_header_bytes_or_None, packet)`` pairs for the
    TUN, one unless plain mode had to cut the payload to ``out_mss``; ``[]``
    when the packet is malformed (drop it).
    """
    if info is None:
        info = peek(packet)
        if info is None:
            return []
    (ihl, doff, flags, seq, ack, window, payload_len, _sport, _dport, tos, total, ident, ff, off,
     csum, urg) = info  # fmt: skip
    if ihl > 20:
        # 5.2.1: IP options are removed.  Rare (Linux never sends them on
        # TCP), so the segment is moved down by a memmove, which is a pass
        # over the payload.  Bytes 12..20 (the old addresses, which the
        # plain-mode checksum update needs) are left in place.
        packet[20 : total - ihl + 20] = packet[ihl:total]
        total -= ihl - 20
    hlen = 20 + doff
    if total < len(packet):
        packet = packet[:total]
    plain = not t.offload
    # A sum mod 0xFFFF is the ones'-complement sum up to the two zeros
    # (daemon.wire.checksum); eqn. 3 below cannot tell them apart either.
    old_sum = int.from_bytes(packet[12:hlen], "big") % _M16 if plain else 0

    # Options (5.4.1, 5.4.3), rewritten in place at their own length.
    if doff > 20:
        # Fast path: Linux's layouts, NOP NOP TS (data) and NOP NOP TS NOP
        # NOP SACK (ACKs during loss recovery), RFC 7323 appendix A.
        fast = False
        if doff >= 32:
            lead, tsval, tsecr = _TS_LAYOUT.unpack_from(packet, 40)
            if lead == _NOP_NOP_TS:
                blocks = _SACK_BLOCKS.get(doff)
                if doff == 32:
                    fast = True
                elif (
                    blocks is not None
                    and _U32.unpack_from(packet, 52)[0] == _NOP_NOP_SACK + doff - 34
                ):
                    fast = True
                    if t._sack_map:
                        d = t._sack_delta
                        blocks.pack_into(
                            packet, 56, *[(x + d) & _M32 for x in blocks.unpack_from(packet, 56)]
                        )
                    else:
                        packet[52:hlen] = _NOPS[: doff - 32]
        if fast:
            if t._ts_map:
                if not flags & ACK:
                    tsecr = 0
                elif t.tsecr_floor_in is not None and (tsecr - t.tsecr_floor_in) & _SIGN:
                    tsecr = t.tsecr_floor_out
                else:
                    tsecr = (tsecr + t.tsecr_delta) & _M32
                _U32X2.pack_into(packet, 44, (tsval + t.tsval_delta) & _M32, tsecr)
            elif t._ts_strip:
                packet[42:52] = _NOP10
        elif not _rewrite_options(t, packet, 40, hlen, flags & ACK):
            return []

    # 5.3; RFC 9293 3.1: the ack field is meaningful only with ACK, and a
    # number from one connection's space must not leak onto the other.
    seq = (seq + t.seq_delta) & _M32
    if not flags & ACK:
        ack = 0
    elif t.ack_delta is not None:
        ack = (ack + t.ack_delta) & _M32
    else:
        ack = t.ack_fixed
    if t.wnd_in_shift != t.wnd_out_shift:
        # 5.4.2 rescale, rounding down, and clamp (see the module docstring).
        window = min((window << t.wnd_in_shift) >> t.wnd_out_shift, _M16)
    tos &= t._tos_mask  # RFC 3168 5: Not-ECT unless both sides negotiated ECN
    flags &= t._flag_mask
    tcp_len = total - 20

    if plain:
        # The checksum field keeps its old value through the pack, so that
        # old_sum and new_sum both include it (see the module docstring).
        new_csum = csum
    else:
        s = t._pseudo_base + tcp_len
        s = (s & _M16) + (s >> 16)
        new_csum = (s & _M16) + (s >> 16)
    s = t._ip_base + (0x4500 | tos) + total + ident + ff
    s = (s & _M16) + (s >> 16)
    s = (s & _M16) + (s >> 16)
    _OUT.pack_into(
        packet,
        0,
        0x45,
        tos,
        total,
        ident,
        ff,
        _TTL,
        _PROTO_TCP,
        ~s & _M16,
        t._addrs,
        t.src_port,
        t.dst_port,
        seq,
        ack,
        off & 0xF0,  # reserved bits and AE (AccECN) cleared
        flags,
        window,
        new_csum,
        urg,
    )

    if plain:
        if payload_len > t.out_mss:
            return _split(t, packet, hlen, payload_len)
        s = (~csum & _M16) + (~old_sum & _M16) + int.from_bytes(packet[12:hlen], "big") % _M16
        s = (s & _M16) + (s >> 16)
        s = (s & _M16) + (s >> 16)
        _U16.pack_into(packet, 20 + TCP_CSUM_OFFSET, ~s & _M16)
        return [(None, packet)]

    # Offload: the kernel cuts at gso_size and copies the options (TS
    # included) into every piece (5.4.4).  An input GSO packet keeps its
    # sender's segment size unless the output MSS is smaller.
    seg_size = payload_len
    if vnet is not None and vnet.gso_type & ~GSO_ECN and vnet.gso_size:
        seg_size = vnet.gso_size
    if seg_size > t.out_mss:
        seg_size = t.out_mss
    if payload_len > seg_size:
        # SKB_GSO_TCP_ECN: CWR goes on the first piece only.
        gso = GSO_TCPV4 | GSO_ECN if flags & _CWR else GSO_TCPV4
        hdr = _VNET.pack(F_NEEDS_CSUM, gso, hlen, seg_size, 20, TCP_CSUM_OFFSET)
    else:
        hdr = _VNET.pack(F_NEEDS_CSUM, GSO_NONE, hlen, 0, 20, TCP_CSUM_OFFSET)
    return [(hdr, packet)]


def _rewrite_options(t: Translator, p: memoryview, i: int, end: int, has_ack: int) -> bool:
    """Map or NOP the TS and SACK options in ``p[i:end]``; False if the list is malformed.

    The checks follow daemon.wire.tcp_options.parse_options (RFC 9293 3.2:
    a length below 2 or past the end is malformed).  Every TS and SACK
    option found is rewritten, so a duplicate cannot carry an unmapped
    number across.
    """
    while i < end:
        kind = p[i]
        if kind == KIND_EOL:
            return True  # the rest is padding
        if kind == KIND_NOP:
            i += 1
            continue
        if i + 1 >= end:
            return False
        length = p[i + 1]
        if length < 2 or i + length > end:
            return False
        if kind == KIND_TIMESTAMP:
            if length != 10:
                return False
            if t._ts_map:
                tsval, tsecr = _U32X2.unpack_from(p, i + 2)
                if not has_ack:
                    tsecr = 0
                elif t.tsecr_floor_in is not None and (tsecr - t.tsecr_floor_in) & _SIGN:
                    tsecr = t.tsecr_floor_out
                else:
                    tsecr = (tsecr + t.tsecr_delta) & _M32
                _U32X2.pack_into(p, i + 2, (tsval + t.tsval_delta) & _M32, tsecr)
            elif t._ts_strip:
                p[i : i + 10] = _NOP10
        elif kind == KIND_SACK:
            count, rest = divmod(length - 2, 8)
            if rest or not 1 <= count <= MAX_SACK_BLOCKS:
                return False
            if t._sack_map:
                delta = t._sack_delta
                for j in range(i + 2, i + length, 8):
                    left, right = _U32X2.unpack_from(p, j)
                    _U32X2.pack_into(p, j, (left + delta) & _M32, (right + delta) & _M32)
            else:
                p[i : i + length] = _NOPS[:length]
        else:
            fixed = _FIXED_LEN.get(kind)
            if fixed is not None and length != fixed:
                return False
        i += length
    return True


def _split(
    t: Translator, packet: memoryview, hlen: int, payload_len: int
) -> list[tuple[bytes | None, memoryview | bytearray]]:
    """Plain mode, payload over out_mss: cut into out_mss pieces (5.4.4; the rare path).

    ``packet`` holds the rewritten headers (checksum field not yet valid).
    Each piece gets those headers with its own length, sequence number and
    a full checksum; PSH and FIN go on the last piece only, as a sender
    would have set them.  The urgent pointer is an offset from the
    segment's sequence number (RFC 9293 3.1), so it is rebased per piece
    and URG dropped from pieces past the urgent data.
    """
    _v, tos, _total, ident, ff, *_ = _IP_HEAD.unpack_from(packet)
    sport, dport, seq, ack, off, flags, window, _csum, urg = _TCP.unpack_from(packet, 20)
    header = bytes(packet[:hlen])
    mss = t.out_mss
    out: list[tuple[bytes | None, memoryview | bytearray]] = []
    for start in range(0, payload_len, mss):
        size = min(mss, payload_len - start)
        piece_flags = flags
        if start + size < payload_len:
            piece_flags &= ~(PSH | FIN)
        if start:
            piece_flags &= ~_CWR  # RFC 3168 6.1.2: once, on the first piece
        piece_urg = urg - start
        if not flags & URG or piece_urg <= 0:
            piece_flags &= ~URG
            piece_urg = 0
        total = hlen + size
        piece_ident = (ident + len(out)) & _M16
        buf = bytearray(total)
        buf[:hlen] = header
        buf[hlen:] = packet[hlen + start : hlen + start + size]
        _OUT.pack_into(
            buf,
            0,
            0x45,
            tos,
            total,
            piece_ident,
            ff,
            _TTL,
            _PROTO_TCP,
            0,
            t._addrs,
            sport,
            dport,
            (seq + start) & _M32,
            ack,
            off,
            piece_flags,
            window,
            0,
            piece_urg,
        )
        view = memoryview(buf)
        _U16.pack_into(buf, 10, internet_checksum(view[:20]))
        pseudo = t._pseudo_base + total - 20
        _U16.pack_into(buf, 20 + TCP_CSUM_OFFSET, internet_checksum(view[20:], pseudo))
        out.append((None, buf))
    return out
