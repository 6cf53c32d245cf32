"""Initial sequence numbers, RFC 6528.

RFCs to read first: RFC 6528 section 3 (ISN = M + F(localip, localport,
remoteip, remoteport, secretkey)), RFC 9293 3.4.1 (the 4 microsecond clock).

M is a clock ticking every 4 us, derived from ``now`` so the generator does
no I/O and is deterministic under simulated time.  F is a keyed BLAKE2s hash
(RFC 6528 recommends a keyed hash; MD5 is no longer a good choice) with a
per-daemon random secret, so an off-path attacker cannot predict the ISN of
another connection while ISNs of successive incarnations of one 4-tuple keep
increasing with the clock (what TIME-WAIT assassination protection needs).
"""

from __future__ import annotations

import hashlib
import os

from daemon.tcp.config import Endpoint
from daemon.tcp.seq import MASK

_TICKS_PER_SECOND = 250_000  # one tick per 4 us (RFC 9293 3.4.1)


class IsnGenerator:
    """Produces ISNs; one instance per daemon, holding the secret key."""

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes | None = None) -> None:
        # RFC 6528 3: the secret must be random and at least 128 bits.
        self._secret = secret if secret is not None else os.urandom(16)
        if len(self._secret) < 16:
            raise ValueError("ISN secret must be at least 16 bytes (RFC 6528 3)")

    def isn(self, local: Endpoint, remote: Endpoint, now: float) -> int:
        h = hashlib.blake2s(key=self._secret[:32], digest_size=4)
        h.update(local[0])
        h.update(local[1].to_bytes(2, "big"))
        h.update(remote[0])
        h.update(remote[1].to_bytes(2, "big"))
        m = int(now * _TICKS_PER_SECOND)
        return (m + int.from_bytes(h.digest(), "big")) & MASK
