"""Memory per idle splice: the daemon's RSS with N spliced connections held open.

Builds a private testbed, then per round opens N connections through the
spliced SOCKS5 (64 at a time) to the origin's raw sink, which reads until
EOF, so every splice stays open and idle; reads the daemon's VmRSS before,
while they are held and after they are closed (and 2 MSL has passed).
Prints the growth per splice and whether rounds keep growing the RSS.

    sudo .venv/bin/python -m bench.bench_splice_memory [--splices 2000] [--rounds 3]

A benchmark, not a test: docs/architecture.md ("Memory per splice") has
the numbers of this machine.  The experiment suite measures the same with
its holder (testbed.experiments.memory), at several N, on its testbed.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time

from testbed.experiments.memory import Holder, rss_kib
from testbed.net import Testbed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--splices", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fastpath", default="auto", choices=["auto", "on", "off"])
    args = ap.parse_args()
    # The sink must not time the idle connections out while the holder
    # opens the rest (~250/s): its default idle timeout is 30 s.
    tb = Testbed(
        "mem" + secrets.token_hex(2),
        msl=1.0,
        fastpath=args.fastpath,
        origin_args=("--idle-timeout", "900"),
    )
    try:
        tb.up()
        pid = int(tb.status()["services"]["daemon"]["pid"])
        start = rss_kib(pid)
        print(f"daemon RSS at start {start} KiB; {args.splices} splices per round")
        for rnd in range(args.rounds):
            holder = Holder(tb.host("client"), tb.spliced_socks, tb.sink)
            try:
                n, errors = holder.hold(args.splices)
                failed = sum(errors.values())
                time.sleep(1)
                held = rss_kib(pid)
                holder.close()
            finally:
                holder.stop()
            time.sleep(4)  # 2 MSL (1 s each here) and then some
            after = rss_kib(pid)
            per = (held - start) * 1024 / max(n, 1)
            why = f": {errors}" if failed else ""
            print(
                f"round {rnd}: {n} held ({failed} failed{why}): RSS {held} KiB"
                f" ({per / 1024:.1f} KiB per splice over the start), {after} KiB after closing"
            )
    finally:
        tb.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
