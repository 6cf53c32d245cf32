"""What one API request costs a proxy before the daemon does anything: the round trip of a no-op.

Run as root with the testbed up (``make testbed up``), from the repo root:

    .venv/bin/python -m bench.bench_api [--requests 300] [--gap-ms 2]

``list`` (a request that reads nothing but the daemon's tables) sent N
times to the testbed's daemon, one at a time with a pause between them (a
proxy's requests come one per connection, not back to back), three ways:
a raw socket that writes the line and reads the reply itself, the threaded
client (``daemon.api.client``: its reader thread hands each reply to the
caller's thread) and the asyncio client (``daemon.api.aio``).  Medians,
p10 and p90 in microseconds: the floor under every ``splice_sockets``, of
which half (the way in) lies before the daemon can forward the client's
first request (docs/architecture.md, "Connection setup", round six).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import socket
import time
from collections.abc import Callable

from daemon.api.aio import AsyncSpliceClient
from daemon.api.client import SpliceClient
from testbed.net import Testbed
from testbed.topology import DEFAULT_PREFIX


def summary(xs: list[float]) -> str:
    xs = sorted(xs)
    n = len(xs)
    return (
        f"median {xs[n // 2] * 1e6:5.0f} us, p10 {xs[n // 10] * 1e6:5.0f} us, "
        f"p90 {xs[n * 9 // 10] * 1e6:5.0f} us"
    )


def timed(call: Callable[[], object], requests: int, gap: float) -> list[float]:
    out = []
    for _ in range(requests):
        t = time.perf_counter()
        call()
        out.append(time.perf_counter() - t)
        time.sleep(gap)
    return out


def raw(path: str, requests: int, gap: float) -> list[float]:
    ids = itertools.count(1)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)

        def call() -> None:
            s.sendall(b'{"id":%d,"op":"list"}\n' % next(ids))
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = s.recv(1 << 16)
                if not chunk:
                    raise ConnectionError("the daemon closed the API connection")
                reply += chunk

        return timed(call, requests, gap)


def threaded(path: str, requests: int, gap: float) -> list[float]:
    with SpliceClient(path) as api:
        return timed(api.list, requests, gap)


def asynchronous(path: str, requests: int, gap: float) -> list[float]:
    async def run() -> list[float]:
        async with await AsyncSpliceClient.open(path) as api:
            out = []
            for _ in range(requests):
                t = time.perf_counter()
                await api.list()
                out.append(time.perf_counter() - t)
                await asyncio.sleep(gap)
            return out

    return asyncio.run(run())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--gap-ms", type=float, default=2.0)
    ap.add_argument("--prefix", default=DEFAULT_PREFIX)
    args = ap.parse_args()
    path = str(Testbed(prefix=args.prefix).daemon_socket)
    gap = args.gap_ms / 1000
    for name, fn in (("raw socket", raw), ("threaded client", threaded), ("asyncio", asynchronous)):
        print(f"{name:16s} {summary(fn(path, args.requests, gap))}")


if __name__ == "__main__":
    main()
