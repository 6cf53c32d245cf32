"""TCP options: parse to and emit from ``TcpOptions``.

Kinds handled (RFC 9293 3.2, RFC 7323, RFC 2018): EOL (0), NOP (1), MSS (2),
window scale (3), SACK-permitted (4), SACK (5), timestamps (8).  Unknown
kinds are skipped by their length byte (RFC 9293 3.2: "must be prepared to
handle an illegal option length").  A malformed option list -- a length byte
of 0 or 1, an option running past the end, a known kind with the wrong fixed
length, a SACK option with other than 1-4 blocks -- raises ``WireError``; the
segment is then dropped as a whole, as Linux does for a SYN and as is safe
for any segment (a sender that produces these is broken).

Emission follows Linux's ``tcp_options_write`` order and 4-byte alignment so
that captures of the daemon look like captures of a kernel:
MSS, SACK-permitted+TS (or NOP NOP TS), NOP WS, NOP NOP SACK-permitted
(without TS), NOP NOP SACK blocks.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from daemon.wire.error import WireError

KIND_EOL = 0
KIND_NOP = 1
KIND_MSS = 2
KIND_WSCALE = 3
KIND_SACK_PERMITTED = 4
KIND_SACK = 5
KIND_TIMESTAMP = 8

MAX_OPTIONS_LEN = 40  # data offset is at most 15 words, 5 of them fixed header
MAX_SACK_BLOCKS = 4  # 2 + 8 * 4 = 34 bytes fits in 40 (RFC 2018 3)


@dataclass(slots=True)
class TcpOptions:
    """The TCP options this project understands (RFC 9293 3.2, RFC 7323, RFC 2018).

    ``None`` / ``False`` / empty means the option is absent.  Unknown options
    are skipped by the parser (by their length byte) and not represented.
    Defined here, next to its parser, and re-exported by daemon.wire.tcp.
    """

    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    sack_blocks: tuple[tuple[int, int], ...] = ()
    timestamp: tuple[int, int] | None = None  # (TSval, TSecr)


_FIXED_LEN = {KIND_MSS: 4, KIND_WSCALE: 3, KIND_SACK_PERMITTED: 2, KIND_TIMESTAMP: 10}
_U16 = struct.Struct("!H")
_U32X2 = struct.Struct("!II")
_NOP_NOP_TS = bytes([KIND_NOP, KIND_NOP, KIND_TIMESTAMP, 10])


def parse_options(data: bytes | bytearray | memoryview) -> TcpOptions:
    """Parse the option bytes of a TCP header (between byte 20 and the data offset)."""
    n = len(data)
    if n == 12 and data[:4] == _NOP_NOP_TS:
        # Fast path: nearly every data segment between Linux hosts carries
        # exactly NOP NOP TS (RFC 7323 appendix A layout).
        return TcpOptions(timestamp=_U32X2.unpack_from(data, 4))
    opts = TcpOptions()
    i = 0
    while i < n:
        kind = data[i]
        if kind == KIND_EOL:
            break
        if kind == KIND_NOP:
            i += 1
            continue
        if i + 1 >= n:
            raise WireError(f"TCP option kind {kind}: no length byte")
        length = data[i + 1]
        if length < 2:
            raise WireError(f"TCP option kind {kind}: length {length}")
        if i + length > n:
            raise WireError(f"TCP option kind {kind}: length {length} runs past the end")
        fixed = _FIXED_LEN.get(kind)
        if fixed is not None and length != fixed:
            raise WireError(f"TCP option kind {kind}: length {length}, expected {fixed}")
        if kind == KIND_MSS:
            opts.mss = _U16.unpack_from(data, i + 2)[0]
        elif kind == KIND_WSCALE:
            # Raw shift as sent; clamping to 14 (RFC 7323 2.3) is the endpoint's job.
            opts.wscale = data[i + 2]
        elif kind == KIND_SACK_PERMITTED:
            opts.sack_permitted = True
        elif kind == KIND_TIMESTAMP:
            opts.timestamp = _U32X2.unpack_from(data, i + 2)
        elif kind == KIND_SACK:
            count, rest = divmod(length - 2, 8)
            if rest or not 1 <= count <= MAX_SACK_BLOCKS:
                raise WireError(f"TCP SACK option: length {length}")
            opts.sack_blocks = tuple(_U32X2.unpack_from(data, i + 2 + 8 * b) for b in range(count))
        i += length
    return opts


def find_timestamp(data: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """(TSval, TSecr) of an option list, or None if absent or the list is malformed."""
    if len(data) >= 12 and data[:4] == _NOP_NOP_TS:
        tsval, tsecr = _U32X2.unpack_from(data, 4)
        return tsval, tsecr
    try:
        return parse_options(data).timestamp
    except WireError:
        return None


def options_len(opts: TcpOptions) -> int:
    """Bytes ``emit_options`` will produce for ``opts`` (a multiple of 4)."""
    n = 0
    if opts.mss is not None:
        n += 4
    if opts.timestamp is not None:
        n += 12  # SACK-permitted+TS or NOP NOP TS, both 12 bytes
    elif opts.sack_permitted:
        n += 4
    if opts.wscale is not None:
        n += 4
    if opts.sack_blocks:
        n += 4 + 8 * len(opts.sack_blocks)
    return n


def emit_options(opts: TcpOptions, buffer: bytearray | memoryview, offset: int = 0) -> int:
    """Write ``opts`` at ``offset``; returns the byte count (a multiple of 4).

    Raises ``WireError`` if the options cannot fit in 40 bytes (e.g. 4 SACK
    blocks together with timestamps: Linux sends at most 3 then).
    """
    total = options_len(opts)
    if total > MAX_OPTIONS_LEN:
        raise WireError(f"TCP options need {total} bytes, more than {MAX_OPTIONS_LEN}")
    if opts.sack_blocks and len(opts.sack_blocks) > MAX_SACK_BLOCKS:
        raise WireError(f"TCP SACK: {len(opts.sack_blocks)} blocks")
    i = offset
    if opts.mss is not None:
        struct.pack_into("!BBH", buffer, i, KIND_MSS, 4, opts.mss)
        i += 4
    if opts.timestamp is not None:
        if opts.sack_permitted:
            struct.pack_into("!BB", buffer, i, KIND_SACK_PERMITTED, 2)
        else:
            struct.pack_into("!BB", buffer, i, KIND_NOP, KIND_NOP)
        tsval, tsecr = opts.timestamp
        struct.pack_into("!BBII", buffer, i + 2, KIND_TIMESTAMP, 10, tsval, tsecr)
        i += 12
    if opts.wscale is not None:
        struct.pack_into("!BBBB", buffer, i, KIND_NOP, KIND_WSCALE, 3, opts.wscale)
        i += 4
    if opts.sack_permitted and opts.timestamp is None:
        struct.pack_into("!BBBB", buffer, i, KIND_NOP, KIND_NOP, KIND_SACK_PERMITTED, 2)
        i += 4
    if opts.sack_blocks:
        count = len(opts.sack_blocks)
        struct.pack_into("!BBBB", buffer, i, KIND_NOP, KIND_NOP, KIND_SACK, 2 + 8 * count)
        i += 4
        for left, right in opts.sack_blocks:
            _U32X2.pack_into(buffer, i, left & 0xFFFFFFFF, right & 0xFFFFFFFF)
            i += 8
    return i - offset


def options_to_bytes(opts: TcpOptions) -> bytes:
    buf = bytearray(options_len(opts))
    emit_options(opts, buf)
    return bytes(buf)
