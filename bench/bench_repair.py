"""What taking a kernel connection over costs (daemon/io/repair.py, daemon/fastpath/sockprobe.py).

Run as root from the repo root: .venv/bin/python -m bench.bench_repair [--connections N]
Two namespaces of its own joined by a veth pair (192.0.2.1 -- 192.0.2.2,
removed at the end); N connections, each with a few bytes in flight, whose
server end is read with ``take_over`` and closed with ``close_silently``;
then the socket probe alone, 1000 times on one connection.  Medians and
p90 in microseconds: the budget this leaves for a splice of two kernel
connections next to the ~2 ms of daemon CPU a splice set-up costs today
(docs/architecture.md, "Connection setup").
"""

from __future__ import annotations

import argparse
import secrets
import socket
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

from pyroute2 import NetNS

from daemon.fastpath.sockprobe import SockProbe
from daemon.io.repair import close_silently, take_over
from testbed import netns

CLIENT, SERVER = "192.0.2.1", "192.0.2.2"


@contextmanager
def veth_pair() -> Iterator[tuple[str, str]]:
    prefix = "brp" + secrets.token_hex(3)
    a, b = f"{prefix}-a", f"{prefix}-b"
    made: list[str] = []
    try:
        for name in (a, b):
            netns.create(name)
            made.append(name)
        with NetNS(a, flags=0) as ns:
            ns.link("add", ifname="eth0", kind="veth", peer={"ifname": "eth0", "net_ns_fd": b})
        for name, addr in ((a, CLIENT), (b, SERVER)):
            with NetNS(name, flags=0) as ns:
                eth = ns.link_lookup(ifname="eth0")[0]
                ns.addr("add", index=eth, address=addr, prefixlen=24)
                ns.link("set", index=eth, state="up")
        yield a, b
    finally:
        for name in made:
            netns.remove(name)


def percentiles(xs: list[float]) -> str:
    xs = sorted(xs)
    return f"median {statistics.median(xs) * 1e6:.0f} us, p90 {xs[len(xs) * 9 // 10] * 1e6:.0f} us"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=200)
    args = ap.parse_args()
    with veth_pair() as (a, b), SockProbe.load() as probe:

        def listen() -> socket.socket:
            s = socket.socket()
            s.bind((SERVER, 0))
            s.listen(64)
            return s

        lsock = netns.call_in(b, listen)
        port = lsock.getsockname()[1]
        read, closed = [], []
        for _ in range(args.connections):
            client = netns.call_in(a, lambda: socket.create_connection((SERVER, port)))
            server, _addr = lsock.accept()
            client.sendall(b"x" * 100)
            server.sendall(b"y" * 100)
            time.sleep(0.001)

            def once(server: socket.socket = server) -> tuple[float, float]:
                t0 = time.perf_counter()
                take_over(server, probe)
                t1 = time.perf_counter()
                close_silently(server)
                return t1 - t0, time.perf_counter() - t1

            r, c = netns.call_in(b, once)
            read.append(r)
            closed.append(c)
            client.close()

        client = netns.call_in(a, lambda: socket.create_connection((SERVER, port)))
        server, _addr = lsock.accept()
        local = (socket.inet_aton(SERVER), port)
        remote = (socket.inet_aton(CLIENT), client.getsockname()[1])

        def probes() -> list[float]:
            out = []
            for _ in range(1000):
                t0 = time.perf_counter()
                probe.read(local, remote)
                out.append(time.perf_counter() - t0)
            return out

        probed = netns.call_in(b, probes)
        client.close()
        server.close()
        lsock.close()
    print(f"take_over ({args.connections} connections): {percentiles(read)}")
    print(f"close_silently: {percentiles(closed)}")
    print(f"socket probe alone (1000 runs): {percentiles(probed)}")


if __name__ == "__main__":
    main()
