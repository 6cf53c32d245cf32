"""Small socket helpers the proxy tests share (no root, no namespaces)."""

from __future__ import annotations

import ctypes
import hashlib
import os
import random
import socket
import time
from collections.abc import Callable
from functools import cache


@cache
def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic pseudo-random content, so a hash tells any reordering or loss."""
    return random.Random(size * 31 + seed).randbytes(size)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll `condition` until it holds (True) or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise AssertionError(f"EOF after {len(data)} of {count} bytes")
        data += chunk
    return bytes(data)


def recv_to_eof(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(1 << 20):
        data += chunk
    return bytes(data)


def other_threads(pid: int) -> list[int]:
    """Thread ids of process `pid` other than its main thread."""
    return [int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid]


def signal_thread(pid: int, tid: int, signum: int) -> None:
    """tgkill(2): `signum` to one thread of another process.

    What the kernel may do with a process-directed kill (give it to a thread
    other than the main one), done deterministically; signal.pthread_kill only
    reaches threads of this process.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.tgkill(pid, tid, signum) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
