"""IPv6 flow labels: one per connection, from a keyed hash of its 4-tuple (RFC 6437).

RFC 6437 3 asks a source to label each flow with a value that is uniformly
distributed (routers hash it for ECMP and load balancing) and not
predictable by an off-path observer, and recommends a stateless hash of the
flow's addresses and ports with a secret.  The label is the same for every
segment of a connection and differs between connections; zero means "no
label" and is never produced.  Both directions of a splice, and both data
paths (the Python relay, the kernel fast path's map entry), label a
connection with this same function, so a connection keeps its label when
its splice moves into the kernel.

The secret is the process's (``SECRET``, random at import): a daemon's
labels need only be stable for its own connections' lifetimes.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache

__all__ = ["MASK", "SECRET", "flow_label", "flow_label_with"]

MASK = 0xFFFFF  # 20 bits
SECRET = os.urandom(16)


def flow_label_with(secret: bytes, src: bytes, sport: int, dst: bytes, dport: int) -> int:
    """The label of the flow src:sport -> dst:dport under ``secret``: 1..2**20-1."""
    h = hashlib.blake2s(digest_size=4, key=secret)
    h.update(src + sport.to_bytes(2, "big") + dst + dport.to_bytes(2, "big"))
    label = int.from_bytes(h.digest(), "big") & MASK
    return label or 1


@lru_cache(maxsize=1 << 16)
def flow_label(src: bytes, sport: int, dst: bytes, dport: int) -> int:
    """``flow_label_with`` this process's secret (cached: one hash per connection)."""
    return flow_label_with(SECRET, src, sport, dst, dport)
