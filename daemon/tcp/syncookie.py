"""SYN cookies: answer a SYN without keeping state, rebuild the connection from its ACK.

RFCs to read first: RFC 4987 3.6 (SYN cookies as a defence against SYN
floods, and what they cost), RFC 7323 2 and 3 (window scale and timestamps
are negotiated only in the SYN, so a stateless server forgets them),
RFC 9293 3.10.7.2 (LISTEN: SYN -> SYN-ACK).

Theory of operation
-------------------
A listener whose SYN-RECEIVED queue is full (``TcpConfig.syn_backlog``)
would otherwise drop SYNs, and a flood of SYNs from spoofed sources keeps it
full: real clients are refused for as long as the flood and the half-open
entries' retransmissions last.  Instead, the listener answers such a SYN
with a SYN-ACK whose ISS is a *cookie* and forgets it.  A real client's ACK
(ack = cookie + 1) proves the 4-tuple was answered by us recently; the
listener recomputes the cookie, and only then creates the connection.

The 32-bit cookie is ``count:5 | mss_index:3 | mac:24``: ``count`` is a
64-second clock (a cookie is valid for the period it was made in and the
next, so 64-128 s), ``mss_index`` the largest entry of ``MSS_TABLE`` not above
the client's MSS, and ``mac`` a keyed BLAKE2s of the 4-tuple, the client's
ISN and the full clock value, so a cookie cannot be guessed for another
connection or replayed after two periods.

What a stateless server forgets is the client's window scale and SACK
permission.  When the client sent timestamps they travel in the low six
bits of our TSval (the client echoes it in TSecr), as Linux does: bit 5
SACK, bits 0-3 the window shift + 1 (0: no scaling).  Our TSval then runs
at most 63 ms behind our clock, which RFC 7323 allows (it only needs to be
monotonic).  Without timestamps the SYN-ACK offers neither window scaling
nor SACK, so both sides agree to go without (RFC 7323 2.2, RFC 2018 2).
"""

from __future__ import annotations

import hashlib
import secrets

from daemon.tcp.config import Endpoint

__all__ = ["MSS_TABLE", "PERIOD", "SynCookies", "decode_ts_bits", "mss_index", "ts_bits"]

PERIOD = 64.0  # seconds per count step
_COUNT_BITS = 5
_MSS_BITS = 3
_MAC_BITS = 32 - _COUNT_BITS - _MSS_BITS
_MAC_MASK = (1 << _MAC_BITS) - 1
# Common MSS values, from the IPv4 minimum to jumbo frames: a client gets the
# largest not above what it asked for (Linux's table is similar).
MSS_TABLE = (536, 1200, 1260, 1360, 1440, 1460, 4312, 8960)
TS_BITS_MASK = 0x3F


class SynCookies:
    """The secret and the clock of one listener's cookies (sans-I/O: time is passed in)."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else secrets.token_bytes(32)

    def _mac(self, local: Endpoint, remote: Endpoint, client_isn: int, count: int) -> int:
        msg = b"%b%d%b%d|%d|%d" % (local[0], local[1], remote[0], remote[1], client_isn, count)
        digest = hashlib.blake2s(msg, key=self._key, digest_size=4).digest()
        return int.from_bytes(digest, "big") & _MAC_MASK

    def make(self, local: Endpoint, remote: Endpoint, client_isn: int, mss: int, now: float) -> int:
        """The ISS for a SYN from ``remote`` with sequence ``client_isn`` asking for ``mss``."""
        index = mss_index(mss)
        count = int(now // PERIOD)
        mac = self._mac(local, remote, client_isn, count)
        return ((count & 0x1F) << 27) | (index << _MAC_BITS) | mac

    def check(
        self, local: Endpoint, remote: Endpoint, client_isn: int, cookie: int, now: float
    ) -> int | None:
        """The MSS the cookie encodes, or None if it is not one we made in the last two periods."""
        count_bits = cookie >> 27
        now_count = int(now // PERIOD)
        for count in (now_count, now_count - 1):
            if count & 0x1F != count_bits:
                continue
            if self._mac(local, remote, client_isn, count) == cookie & _MAC_MASK:
                return MSS_TABLE[(cookie >> _MAC_BITS) & 0x7]
        return None


def mss_index(mss: int) -> int:
    """The index of the largest table MSS not above ``mss`` (the smallest entry at worst)."""
    best = 0
    for i, value in enumerate(MSS_TABLE):
        if value <= mss:
            best = i
    return best


def ts_bits(wscale: int | None, sack: bool) -> int:
    """The six bits a cookie SYN-ACK's TSval carries: bit 5 SACK, bits 0-3 shift + 1."""
    shift = 0 if wscale is None else min(wscale, 14) + 1
    return (0x20 if sack else 0) | shift


def decode_ts_bits(tsecr: int) -> tuple[int | None, bool]:
    """(window shift or None, SACK permitted) from the TSecr echoing a cookie SYN-ACK."""
    shift = tsecr & 0x0F
    return (None if shift == 0 else shift - 1), bool(tsecr & 0x20)
