"""Router vs plain vs endpoint vs spliced (fast path) vs spliced-py SOCKS5, one run.

Builds two private testbeds, one whose splice daemon runs the kernel fast
path (daemon/fastpath) and one whose daemon relays in Python
(``--fastpath off``: the ``spliced-py`` mode); the router, plain and
endpoint modes use the first.  Per mode, interleaved over REPEAT rounds:

* a long curl download (default 256 MB): throughput and the whole
  machine's CPU time per MB (/proc/stat, every namespace's work included);
* iperf3 through the proxy (proxychains4 for the SOCKS modes), client ->
  server and server -> client (-R), default 5 s each;
* the response time of small requests (curl time_total: connect, SOCKS
  handshake, request, last byte; default 1 KB and 1 MB).

Prints medians and each mode's ratio to the router.

    sudo .venv/bin/python -m bench.bench_modes [--size 256M] [--small 1K,1M] [--repeat 5]
        [--iperf-seconds 5] [--modes router,plain,spliced,spliced-py] [--json out.json]

A benchmark, not a test: numbers vary with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clients.loadgen import parse_size
from testbed.net import Host, Testbed

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
ALL_MODES = ["router", "plain", "endpoint", "spliced", "spliced-py"]
IPERF_PORT = 5201


def busy_seconds() -> float:
    """CPU time the whole machine spent busy so far (all CPUs, /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def proxychains_conf(directory: Path, name: str, proxy: tuple[str, int]) -> Path:
    path = directory / f"{name}.conf"
    path.write_text(
        "strict_chain\nquiet_mode\ntcp_read_time_out 15000\ntcp_connect_time_out 8000\n"
        f"[ProxyList]\nsocks5 {proxy[0]} {proxy[1]}\n"
    )
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="256M", help="long download for throughput")
    ap.add_argument("--small", default="1K,1M", help="sizes for response times")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--iperf-seconds", type=int, default=5, help="0: no iperf3 runs")
    ap.add_argument("--modes", default=",".join(ALL_MODES))
    ap.add_argument("--json", type=Path, help="write every sample here")
    args = ap.parse_args()
    size = parse_size(args.size)
    small = [parse_size(s) for s in args.small.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in ALL_MODES:
            ap.error(f"unknown mode {m!r} (modes: {', '.join(ALL_MODES)})")
    tag = secrets.token_hex(2)
    fast = Testbed("bench" + tag, fastpath="on")
    slow = Testbed("bench" + tag + "p", fastpath="off") if "spliced-py" in modes else None
    tmp = Path(tempfile.mkdtemp(prefix="bench-modes-"))
    iperfs: list[subprocess.Popen[bytes]] = []
    try:
        fast.up()
        if slow is not None:
            slow.up()
        beds = {m: (slow if m == "spliced-py" and slow is not None else fast) for m in modes}
        for bed in {id(b): b for b in beds.values()}.values():
            iperfs.append(
                bed.host("server").popen(
                    ["iperf3", "-s", "-B", bed.origin[0], "-p", str(IPERF_PORT)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        proxies: dict[str, tuple[str, int] | None] = {
            "router": None,
            "plain": fast.socks,
            "endpoint": fast.endpoint_socks,
            "spliced": fast.spliced_socks,
            "spliced-py": slow.spliced_socks if slow is not None else None,
        }
        time.sleep(0.5)
        samples = run(args, modes, beds, proxies, size, small, tmp)
    finally:
        for p in iperfs:
            p.kill()
            p.wait()
        fast.down()
        if slow is not None:
            slow.down()
    report(samples, modes, size, small, args.repeat)
    if args.json:
        args.json.write_text(json.dumps(samples, indent=1))
    return 0


Samples = dict[str, list[dict[str, Any]]]


def run(
    args: argparse.Namespace,
    modes: list[str],
    beds: dict[str, Testbed],
    proxies: dict[str, tuple[str, int] | None],
    size: int,
    small: list[int],
    tmp: Path,
) -> Samples:
    samples: Samples = {}

    def add(kind: str, **row: Any) -> None:
        samples.setdefault(kind, []).append(row)

    for rnd in range(args.repeat):
        for mode in modes:
            bed, proxy = beds[mode], proxies[mode]
            client = bed.host("client")
            extra = [] if proxy is None else ["--socks5", "{}:{}".format(*proxy)]
            url = "http://{}:{}/bytes/{}".format(*bed.origin, size)
            cpu0 = busy_seconds()
            res = client.cmd([*CURL, *extra, url], timeout=400)
            cpu = busy_seconds() - cpu0
            got, total = res.stdout.split() if res.returncode == 0 else ("0", "0")
            if res.returncode != 0 or int(float(got)) != size:
                print(f"{mode} {size}: failed ({res.returncode}) {res.stderr.strip()}")
            else:
                add("download", mode=mode, round=rnd, seconds=float(total), cpu=cpu)
            if args.iperf_seconds > 0:
                for reverse in (False, True):
                    r = iperf(client, bed, proxy, mode, tmp, args.iperf_seconds, reverse)
                    if r is None:
                        print(f"{mode} iperf3 {'-R ' if reverse else ''}failed")
                    else:
                        bps, cpu = r
                        kind = "iperf_s2c" if reverse else "iperf_c2s"
                        add(kind, mode=mode, round=rnd, bps=bps, cpu=cpu)
            for n in small:
                url = "http://{}:{}/bytes/{}".format(*bed.origin, n)
                res = client.cmd([*CURL, *extra, url], timeout=60)
                got, total = res.stdout.split() if res.returncode == 0 else ("0", "0")
                if res.returncode == 0 and int(float(got)) == n:
                    add(f"small_{n}", mode=mode, round=rnd, seconds=float(total))
                else:
                    print(f"{mode} {n}: failed ({res.returncode}) {res.stderr.strip()}")
    return samples


def iperf(
    client: Host,
    bed: Testbed,
    proxy: tuple[str, int] | None,
    mode: str,
    tmp: Path,
    seconds: int,
    reverse: bool,
    congestion: str | None = None,
) -> tuple[float, float] | None:
    """(bits/s received, machine CPU ms per MB) of one iperf3 run, None if it failed.

    ``congestion`` is iperf3's -C: the algorithm of both ends' test sockets.
    """
    argv = ["iperf3", "-c", bed.origin[0], "-p", str(IPERF_PORT), "-t", str(seconds), "-J"]
    if reverse:
        argv.append("-R")
    if congestion is not None:
        argv += ["-C", congestion]
    if proxy is not None:
        argv = ["proxychains4", "-q", "-f", str(proxychains_conf(tmp, mode, proxy)), *argv]
    cpu0 = busy_seconds()
    res = client.cmd(argv, timeout=seconds + 60)
    cpu = busy_seconds() - cpu0
    try:
        end = json.loads(res.stdout)["end"]
        bps = float(end["sum_received"]["bits_per_second"])
        nbytes = float(end["sum_received"]["bytes"])
    except (ValueError, KeyError):
        return None
    return bps, cpu / (nbytes / 1e6) if nbytes else 0.0


def report(samples: Samples, modes: list[str], size: int, small: list[int], repeat: int) -> None:
    print(f"{repeat} rounds, medians ({time.strftime('%F %T')}), ratios to the router")

    def med(kind: str, mode: str, key: Callable[[dict[str, Any]], float]) -> float | None:
        vals = [key(r) for r in samples.get(kind, []) if r["mode"] == mode]
        return statistics.median(vals) if vals else None

    print(f"{size >> 20} MB download       MB/s   x router   CPU ms/MB   x router")
    base_t = med("download", "router", lambda r: r["seconds"])
    base_c = med("download", "router", lambda r: r["cpu"] / (size / 1e6))
    for mode in modes:
        t = med("download", mode, lambda r: r["seconds"])
        c = med("download", mode, lambda r: r["cpu"] / (size / 1e6))
        if t is None or c is None or base_t is None or base_c is None:
            print(f"  {mode:<14} no successful run")
            continue
        print(
            f"  {mode:<14} {size / t / 1e6:8.0f} {base_t / t:8.2f}x "
            f"{c * 1000:10.2f} {c / base_c:8.2f}x"
        )
    for kind, label in (("iperf_c2s", "client -> server"), ("iperf_s2c", "server -> client")):
        if kind not in samples:
            continue
        print(f"iperf3 {label:<17} Mbit/s   x router   CPU ms/MB   x router")
        base_b = med(kind, "router", lambda r: r["bps"])
        base_c = med(kind, "router", lambda r: r["cpu"])
        for mode in modes:
            b = med(kind, mode, lambda r: r["bps"])
            c = med(kind, mode, lambda r: r["cpu"])
            if b is None or c is None or not base_b or not base_c:
                print(f"  {mode:<14} no successful run")
                continue
            print(
                f"  {mode:<14} {b / 1e6:8.0f} {b / base_b:8.2f}x "
                f"{c * 1000:10.2f} {c / base_c:8.2f}x"
            )
    for n in small:
        print(f"response time of {n} bytes:")
        base = med(f"small_{n}", "router", lambda r: r["seconds"])
        for mode in modes:
            t = med(f"small_{n}", mode, lambda r: r["seconds"])
            if t is None or base is None:
                print(f"  {mode:<14} no successful run")
                continue
            print(f"  {mode:<14} {t * 1000:8.2f} ms {t / base:8.2f}x router's time")


if __name__ == "__main__":
    sys.exit(main())
