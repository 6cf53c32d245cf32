"""iperf3 through the proxies over a link with real delay: router, plain, spliced(-kernel, -py).

Builds two private testbeds (the spliced daemon with the kernel fast path,
and one with ``--fastpath off`` for spliced-py), puts DELAY on one link of
each (default client-proxy, 10 ms each way: 20 ms RTT), and runs iperf3 in
both directions per mode and congestion control (iperf3 -C sets it on both
ends' test sockets), rounds interleaved.  Prints medians in Mbit/s and
ratios to the router.

    sudo .venv/bin/python -m bench.bench_wan [--link client-proxy] [--delay 10ms]
        [--seconds 8] [--repeat 3] [--cc bbr,cubic]
        [--modes router,plain,spliced,spliced-kernel,spliced-py]

A benchmark, not a test.  The delay is the testbed's NFQUEUE impairment
(docs/testbed.md), which itself tops out near 400 Mbit/s on this machine:
the router's figure is that ceiling, and the question is whether a mode
keeps up with it.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_modes import IPERF_PORT, iperf
from testbed.net import Testbed

ALL_MODES = ["router", "plain", "spliced", "spliced-kernel", "spliced-py"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--link", default="client-proxy", choices=["client-proxy", "proxy-server"])
    ap.add_argument("--delay", default="10ms")
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cc", default="bbr,cubic")
    ap.add_argument("--modes", default=",".join(ALL_MODES))
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    ccs = [c for c in args.cc.split(",") if c]
    tag = secrets.token_hex(2)
    fast = Testbed("wan" + tag, fastpath="on")
    slow = Testbed("wan" + tag + "p", fastpath="off") if "spliced-py" in modes else None
    tmp = Path(tempfile.mkdtemp(prefix="bench-wan-"))
    servers: list[subprocess.Popen[bytes]] = []
    results: dict[tuple[str, str, str], list[float]] = {}
    try:
        beds = [fast] + ([slow] if slow is not None else [])
        for bed in beds:
            bed.up()
            bed.link(args.link).shape(f"delay={args.delay}")
            servers.append(
                bed.host("server").popen(
                    ["iperf3", "-s", "-B", bed.origin[0], "-p", str(IPERF_PORT)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        time.sleep(0.5)
        proxies = {
            "router": (fast, None),
            "plain": (fast, fast.socks),
            "spliced": (fast, fast.spliced_socks),
            # The kernel SOCKS5 (splice_sockets): the origin's handshake is the
            # proxy's kernel's, the RTT trap of docs/architecture.md "Over real latency".
            "spliced-kernel": (fast, fast.kernel_socks),
            "spliced-py": (slow, slow.spliced_socks if slow is not None else None),
        }
        for rnd in range(args.repeat):
            for cc in ccs:
                for mode in modes:
                    mode_bed, proxy = proxies[mode]
                    assert mode_bed is not None
                    for direction in ("c2s", "s2c"):
                        run = iperf(
                            mode_bed.host("client"),
                            mode_bed,
                            proxy,
                            f"{mode}-{rnd}",
                            tmp,
                            args.seconds,
                            reverse=direction == "s2c",
                            congestion=cc,
                        )
                        if run is None:
                            print(f"{mode} {cc} {direction} round {rnd}: iperf3 failed")
                            continue
                        results.setdefault((cc, mode, direction), []).append(run[0])
    finally:
        for p in servers:
            p.kill()
            p.wait()
        fast.down()
        if slow is not None:
            slow.down()
    print(
        f"iperf3 {args.seconds} s, {args.repeat} rounds, delay {args.delay} on {args.link},"
        f" medians ({time.strftime('%F %T')})"
    )
    print("cc     mode          c->s Mbit/s  x router   s->c Mbit/s  x router")
    for cc in ccs:
        for mode in modes:
            row = f"{cc:<6} {mode:<12}"
            for direction in ("c2s", "s2c"):
                got = results.get((cc, mode, direction))
                base = results.get((cc, "router", direction))
                if not got or not base:
                    row += "            -         -"
                    continue
                m, b = statistics.median(got), statistics.median(base)
                row += f" {m / 1e6:12.0f} {m / b:8.2f}x"
            print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
