"""Router vs plain SOCKS5 vs daemon-endpoint SOCKS5 vs spliced SOCKS5, one run.

Builds a private testbed, then with curl in the client namespace measures,
per mode, the throughput of a long download (default 256 MB) and the
response time of small requests (default 1 KB and 1 MB: request sent to
last byte, as curl's time_total), modes interleaved, REPEAT rounds.
Prints medians and the ratio of each mode to the router.

    sudo .venv/bin/python -m bench.bench_modes [--size 256M] [--small 1K,1M] [--repeat 5]

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
    "%{size_download} %{time_total}",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="256M", help="long download for throughput")
    ap.add_argument("--small", default="1K,1M", help="sizes for response times")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    size = parse_size(args.size)
    small = [parse_size(s) for s in args.small.split(",") if s]
    with Testbed("bench" + secrets.token_hex(2)) as tb:
        ip, port = tb.origin
        modes = {
            "router": [],
            "plain socks5": ["--socks5", "{}:{}".format(*tb.socks)],
            "endpoint socks5": ["--socks5", "{}:{}".format(*tb.endpoint_socks)],
            "spliced socks5": ["--socks5", "{}:{}".format(*tb.spliced_socks)],
        }
        client = tb.host("client")
        cells: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.repeat):
            for n in [size, *small]:
                for mode, extra in modes.items():
                    res = client.cmd([*CURL, *extra, f"http://{ip}:{port}/bytes/{n}"], timeout=400)
                    got, total = res.stdout.split() if res.returncode == 0 else ("0", "0")
                    if res.returncode != 0 or int(float(got)) != n:
                        print(f"{mode} {n}: failed ({res.returncode}) {res.stderr.strip()}")
                        continue
                    cells.setdefault((mode, n), []).append(float(total))
        print(f"{args.repeat} rounds, medians ({time.strftime('%F %T')}), ratios to the router")
        print(f"throughput of a {size >> 20} MB download:")
        for mode in modes:
            times = cells.get((mode, size), [])
            base = cells.get(("router", size), [])
            if not times or not base:
                print(f"  {mode:<18} no successful run")
                continue
            rate = size / statistics.median(times) / 1e6
            ratio = statistics.median(base) / statistics.median(times)
            print(f"  {mode:<18} {rate:8.0f} MB/s   {ratio:5.2f}x router")
        for n in small:
            print(f"response time of {n} bytes:")
            for mode in modes:
                times = cells.get((mode, n), [])
                base = cells.get(("router", n), [])
                if not times or not base:
                    print(f"  {mode:<18} no successful run")
                    continue
                med = statistics.median(times)
                print(
                    f"  {mode:<18} {med * 1000:8.2f} ms      "
                    f"{med / statistics.median(base):5.2f}x router's time"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
