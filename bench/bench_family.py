"""Downloads over IPv4, IPv6 and across families: router, plain, endpoint and spliced, one run.

Builds one testbed (its daemon runs the kernel fast path where BPF works)
and downloads SIZE bytes from the origin with curl, per path and per
(client family, server family): the router (the proxy host forwarding),
the plain SOCKS5 (kernel sockets, copying), the endpoint SOCKS5 (the
daemon's TCP, copying) and the spliced SOCKS5, whose steady state runs
in the kernel fast path in every family pair (the tc program changes the
header's family across them) where BPF works.  Rounds interleaved; round 0 checks every
path's body by SHA-256, the timed rounds write to /dev/null and take curl's
own time_total (a hash in the client would be the bottleneck).  Prints
median seconds, MB/s and the ratio to the router of the same server family.

    sudo .venv/bin/python -m bench.bench_family [--size 64M] [--repeat 3]

A benchmark, not a test: tests/test_splice_ipv6.py checks the behaviour.
"""

from __future__ import annotations

import argparse
import secrets
import statistics

from clients.loadgen import parse_size
from servers.address import format_host_port
from testbed.net import Testbed
from tests.helpers import curl_sha256, pattern_sha256

PAIRS = [(4, 4), (6, 6), (4, 6), (6, 4)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="64M")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    size = parse_size(args.size)
    bed = Testbed("fb" + secrets.token_hex(2), msl=1.0)
    times: dict[tuple[str, int, int], list[float]] = {}
    try:
        bed.up()
        for rnd in range(args.repeat):
            for client, server in PAIRS:
                origin = bed.origin6 if server == 6 else bed.origin
                url = f"http://{format_host_port(*origin)}/bytes/{size}"
                paths: list[tuple[str, list[str]]] = [
                    (
                        "plain",
                        ["--socks5", format_host_port(*bed.socks6 if client == 6 else bed.socks)],
                    ),
                    (
                        "endpoint",
                        [
                            "--socks5",
                            format_host_port(
                                *bed.endpoint_socks6 if client == 6 else bed.endpoint_socks
                            ),
                        ],
                    ),
                    (
                        "spliced",
                        [
                            "--socks5",
                            format_host_port(
                                *bed.spliced_socks6 if client == 6 else bed.spliced_socks
                            ),
                        ],
                    ),
                ]
                if client == server:
                    paths.insert(0, ("router", []))
                for name, extra in paths:
                    label = f"{name} v{client}->v{server}"
                    if rnd == 0:
                        rc, digest = curl_sha256(bed.host("client"), url, *extra, timeout=600)
                        if rc != 0 or digest != pattern_sha256(size):
                            print(f"{label}: FAILED (curl {rc}, sha256 {digest[:12]})", flush=True)
                            continue
                    res = bed.host("client").cmd(
                        [
                            "curl",
                            "-sS",
                            "-o",
                            "/dev/null",
                            "-w",
                            "%{size_download} %{time_total}",
                            *extra,
                            url,
                        ],
                        timeout=600,
                    )
                    got, took = res.stdout.split() if res.returncode == 0 else ("0", "0")
                    ok = int(got) == size
                    print(f"round {rnd} {label}: {float(took):.2f} s{'' if ok else ' FAILED'}")
                    if ok:
                        times.setdefault((name, client, server), []).append(float(took))
    finally:
        bed.down()
    print(f"\n{args.size} download, median of {args.repeat} (ratio: to the router, server family):")
    for (name, client, server), samples in times.items():
        med = statistics.median(samples)
        router = statistics.median(times.get(("router", server, server), [float("nan")]))
        print(
            f"  {name:9s} v{client}->v{server}  {med:7.2f} s  {size / med / 1e6:7.1f} MB/s"
            f"  x router {router / med:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
