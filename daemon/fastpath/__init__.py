"""The in-kernel fast path for spliced flows: a tc eBPF program and its loader.

See DESIGN.md "The kernel fast path for spliced flows"; the program is
splice.bpf.c, its map layout splice_map.h (mirrored in layout.py).
"""

from daemon.fastpath.layout import FlowKey, encode, encode_key
from daemon.fastpath.loader import (
    DEFAULT_OBJECT,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    FastPath,
    FastPathUnavailable,
)

__all__ = [
    "DEFAULT_OBJECT",
    "TC_ACT_OK",
    "TC_ACT_REDIRECT",
    "FastPath",
    "FastPathUnavailable",
    "FlowKey",
    "encode",
    "encode_key",
]
