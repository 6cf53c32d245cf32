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

A connection the daemon took over from the kernel (daemon/io/repair.py)
already has a label, the kernel's automatic one (``kernel_flow_label``):
its TCB keeps it (``TcpConnection.flow_label``), as RFC 6437 asks of a flow.
"""

from __future__ import annotations

import hashlib
import os
import sys
from functools import lru_cache

__all__ = ["MASK", "SECRET", "flow_label", "flow_label_with", "kernel_flow_label"]

MASK = 0xFFFFF  # 20 bits
SECRET = os.urandom(16)


def flow_label_with(secret: bytes, src: bytes, sport: int, dst: bytes, dport: int) -> int:
    """The label of the flow src:sport -> dst:dport under ``secret``: 1..2**20-1."""
    h = hashlib.blake2s(digest_size=4, key=secret)
    h.update(src + sport.to_bytes(2, "big") + dst + dport.to_bytes(2, "big"))
    label = int.from_bytes(h.digest(), "big") & MASK
    return label or 1


STATELESS_FLAG = 0x80000  # RFC 6437's old "stateless" range bit, Linux's flowlabel_state_ranges


@lru_cache(maxsize=1 << 16)
def flow_label(src: bytes, sport: int, dst: bytes, dport: int) -> int:
    """``flow_label_with`` this process's secret (cached: one hash per connection)."""
    return flow_label_with(SECRET, src, sport, dst, dport)


def kernel_flow_label(txhash: int, state_ranges: bool) -> int:
    """The label Linux gives a socket's packets from its ``sk_txhash`` (ip6_make_flowlabel).

    The hash rotated by 16 bits and stored as it is in memory, then read as
    the header's big-endian word (the kernel casts it to ``__be32``): its low
    20 bits, with the "stateless" bit set where
    ``net.ipv6.flowlabel_state_ranges`` asks for it.  Checked against the
    wire: txhash 0x9a0c4f09 went out as label 0xa094f (x86).
    """
    rotated = ((txhash << 16) | (txhash >> 16)) & 0xFFFFFFFF
    label = int.from_bytes(rotated.to_bytes(4, sys.byteorder), "big") & MASK
    return label | STATELESS_FLAG if state_ranges else label
