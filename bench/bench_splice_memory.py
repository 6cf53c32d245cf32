"""Memory per idle splice: the daemon's RSS with N spliced connections held open.

Builds a private testbed, then per round opens N connections through the
spliced SOCKS5 (64 at a time) to the origin's raw sink, which reads until
EOF, so every splice stays open and idle; reads the daemon's VmRSS before,
while they are held and after they are closed (and 2 MSL has passed).
Prints the growth per splice and whether rounds keep growing the RSS.

    sudo .venv/bin/python -m bench.bench_splice_memory [--splices 2000] [--rounds 3]

A benchmark, not a test: docs/architecture.md ("Memory per splice") has
the numbers of this machine.
"""

from __future__ import annotations

import argparse
import secrets
import subprocess
import sys
import time
from pathlib import Path

from testbed.net import Testbed

HOLDER = r"""
import resource, socket, sys
from concurrent.futures import ThreadPoolExecutor
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
proxy, sink, n = (sys.argv[1], int(sys.argv[2])), (sys.argv[3], int(sys.argv[4])), int(sys.argv[5])
request = bytes([5, 1, 0, 1, *socket.inet_aton(sink[0])]) + sink[1].to_bytes(2, "big")
def one(_):
    s = socket.create_connection(proxy, timeout=10)
    s.sendall(b"\x05\x01\x00")
    ok = s.recv(2) == b"\x05\x00"
    s.sendall(request)
    reply = b""
    while len(reply) < 10:
        chunk = s.recv(10 - len(reply))
        if not chunk:
            break
        reply += chunk
    return s, ok and len(reply) == 10 and reply[1] == 0
with ThreadPoolExecutor(64) as pool:
    held = list(pool.map(one, range(n)))
print(len(held), sum(not ok for _, ok in held), flush=True)
sys.stdin.readline()
for s, _ in held:
    s.close()
print("closed", flush=True)
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--splices", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fastpath", default="auto", choices=["auto", "on", "off"])
    args = ap.parse_args()
    tb = Testbed("mem" + secrets.token_hex(2), msl=1.0, fastpath=args.fastpath)
    try:
        tb.up()
        pid = int(tb.status()["services"]["daemon"]["pid"])
        start = rss_kib(pid)
        print(f"daemon RSS at start {start} KiB; {args.splices} splices per round")
        for rnd in range(args.rounds):
            holder = tb.host("client").popen(
                [
                    sys.executable,
                    "-c",
                    HOLDER,
                    *map(str, tb.spliced_socks),
                    *map(str, tb.sink),
                    str(args.splices),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert holder.stdin is not None and holder.stdout is not None
            n, failed = map(int, holder.stdout.readline().split())
            time.sleep(1)
            held = rss_kib(pid)
            holder.stdin.write("\n")
            holder.stdin.flush()
            holder.stdout.readline()
            holder.wait(timeout=60)
            time.sleep(4)  # 2 MSL (1 s each here) and then some
            after = rss_kib(pid)
            per = (held - start) * 1024 / max(n, 1)
            print(
                f"round {rnd}: {n} held ({failed} failed): RSS {held} KiB"
                f" ({per / 1024:.1f} KiB per splice over the start), {after} KiB after closing"
            )
    finally:
        tb.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
