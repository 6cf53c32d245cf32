"""Bulk throughput of the daemon's TCP endpoint against the kernel router, one run.

Builds a private testbed, then downloads SIZE bytes with curl in the client
namespace through: the router (kernel forwarding), the plain SOCKS5 proxy
(kernel sockets, copy loop), and the SOCKS5 proxy whose both TCP
connections the splice daemon terminates.  Modes are interleaved, REPEAT
rounds; prints the median MB/s of each and its ratio to the router.

    sudo .venv/bin/python -m bench.bench_endpoint [--size 256M] [--repeat 5]

A benchmark, not a test: numbers vary with the machine's load.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import time

from clients.loadgen import parse_size
from testbed.net import Testbed

CURL = [
    "curl",
    "-sS",
    "--max-time",
    "300",
    "-o",
    "/dev/null",
    "-w",
    "%{size_download} %{time_total} %{time_starttransfer}",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="256M")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    size = parse_size(args.size)
    with Testbed("bench" + secrets.token_hex(2)) as tb:
        ip, port = tb.origin
        url = f"http://{ip}:{port}/bytes/{size}"
        modes = {
            "router": [],
            "plain socks5": ["--socks5", "{}:{}".format(*tb.socks)],
            "daemon endpoint socks5": ["--socks5", "{}:{}".format(*tb.endpoint_socks)],
        }
        rates: dict[str, list[float]] = {m: [] for m in modes}
        client = tb.host("client")
        for _ in range(args.repeat):
            for mode, extra in modes.items():
                res = client.cmd([*CURL, *extra, url], timeout=400)
                got, total, _ = res.stdout.split()
                if res.returncode != 0 or int(float(got)) != size:
                    print(f"{mode}: failed ({res.returncode}) {res.stderr.strip()}")
                    continue
                rates[mode].append(size / float(total) / 1e6)
        base = statistics.median(rates["router"]) if rates["router"] else float("nan")
        print(f"{size} bytes, {args.repeat} rounds, median over rounds ({time.strftime('%F %T')})")
        for mode, values in rates.items():
            if not values:
                print(f"  {mode:<24} no successful run")
                continue
            med = statistics.median(values)
            print(
                f"  {mode:<24} {med:8.0f} MB/s  (min {min(values):.0f}, max {max(values):.0f})"
                f"  {med / base:5.2f}x router"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
