"""Keep-alive HTTP through the spliced HTTP/1.1 proxy vs copying vs tinyproxy vs the router.

One private testbed; besides its HTTP/1.1 proxy service (``http11``: every
body with a Content-Length spliced, bounded), this starts on the same daemon
the same proxy copying every body (``http11-copy``: the splice alone is
the difference), the same proxy with a cache that takes every object, so
that each response is a tapped splice filling it (``http11-tap``: the cost
of the TCP tap, thesis 4.4), and Debian's tinyproxy when installed.  Per
size and round, each mode fetches K URLs on one curl connection (distinct
sizes, so no request is ever a cache hit); modes interleaved.

Prints, per size, the median wall time of the K requests, the ratio to the
router (curl straight to the origin) and to the copying proxy, and the
whole machine's CPU seconds per MB (/proc/stat).

    sudo .venv/bin/python -m bench.bench_http11 [--sizes 64K,1M,16M] [--requests 10]
        [--repeat 5] [--modes router,http11,http11-tap,http11-copy,tinyproxy]

A benchmark, not a test: numbers vary with the machine's load.
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_modes import busy_seconds
from clients.loadgen import parse_size
from testbed.net import Testbed

ALL_MODES = ["router", "http11", "http11-tap", "http11-copy", "tinyproxy"]
COPY_PORT, TAP_PORT, TINY_PORT = 3130, 3131, 8898


def _proxy(tb: Testbed, port: int, *extra: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "proxies.http11_proxy", "--daemon", str(tb.daemon_socket)]
    argv += ["--source", "198.51.100.1", "--listen", f"198.51.100.1:{port}", *extra]
    proc = tb.host("proxy").popen(argv, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"ready":
        raise SystemExit(f"the proxy on port {port} did not start")
    return proc


def _tinyproxy(tb: Testbed, work: Path) -> subprocess.Popen[bytes] | None:
    binary = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
    if not Path(binary).exists():
        return None
    conf = work / "tinyproxy.conf"
    conf.write_text(f"Port {TINY_PORT}\nListen 192.0.2.1\nTimeout 600\nMaxClients 100\n")
    proc = tb.host("proxy").popen([binary, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # until it listens
        probe = f"exec 3<>/dev/tcp/192.0.2.1/{TINY_PORT}"
        if tb.host("client").cmd(["bash", "-c", probe]).returncode == 0:
            return proc
        time.sleep(0.05)
    raise SystemExit("tinyproxy did not start listening")


def _fetch(tb: Testbed, proxy: str | None, sizes: list[int], no_cache: bool) -> float:
    """Wall time of one curl fetching every size on one connection."""
    argv = ["curl", "-sS", "--max-time", "300"]
    if proxy is not None:
        argv += ["-x", proxy]
    if no_cache:
        argv += ["-H", "Cache-Control: no-cache"]
    origin = "http://{}:{}".format(*tb.origin)
    for n in sizes:
        argv += [f"{origin}/bytes/{n}", "-o", "/dev/null"]
    start = time.monotonic()
    res = tb.host("client").cmd(argv, timeout=600)
    elapsed = time.monotonic() - start
    if res.returncode != 0:
        raise SystemExit(f"curl through {proxy} failed: {res.stderr}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_http11", description=__doc__)
    ap.add_argument("--sizes", default="64K,1M,16M")
    ap.add_argument("--requests", type=int, default=10, metavar="K")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--modes", default=",".join(ALL_MODES))
    args = ap.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    modes = args.modes.split(",")
    tb = Testbed("bh" + secrets.token_hex(2))
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            tb.up()
            urls: dict[str, str | None] = {"router": None, "http11": "http://198.51.100.1:3129"}
            if "http11-copy" in modes:
                procs.append(
                    _proxy(tb, COPY_PORT, "--splice-min", str(1 << 62), "--origin-rcvbuf", "0")
                )
                urls["http11-copy"] = f"http://198.51.100.1:{COPY_PORT}"
            if "http11-tap" in modes:
                procs.append(_proxy(tb, TAP_PORT, "--cache-max-object", str(1 << 30)))
                urls["http11-tap"] = f"http://198.51.100.1:{TAP_PORT}"
            if "tinyproxy" in modes:
                tiny = _tinyproxy(tb, Path(tmp))
                if tiny is None:
                    print("tinyproxy: not installed, skipped")
                    modes.remove("tinyproxy")
                else:
                    procs.append(tiny)
                    urls["tinyproxy"] = f"http://192.0.2.1:{TINY_PORT}"
            times: dict[tuple[str, int], list[float]] = {}
            cpu: dict[tuple[str, int], list[float]] = {}
            for r in range(args.repeat):
                for size in sizes:
                    # Distinct sizes per round: never a cache hit, and every
                    # mode fetches the same bytes.
                    batch = [size + r * args.requests + i for i in range(args.requests)]
                    for mode in modes:
                        before = busy_seconds()
                        t = _fetch(tb, urls[mode], batch, no_cache=mode != "http11-tap")
                        mb = sum(batch) / 1e6
                        times.setdefault((mode, size), []).append(t)
                        cpu.setdefault((mode, size), []).append((busy_seconds() - before) / mb)
            print(f"{args.requests} requests per connection, median of {args.repeat} rounds")
            head = ("size", "mode", "time", "x router", "x copy", "CPU s/MB")
            print("{:>6} {:<12} {:>9} {:>9} {:>8} {:>9}".format(*head))
            for size in sizes:
                router = statistics.median(times[("router", size)])
                copy = statistics.median(times.get(("http11-copy", size), [float("nan")]))
                for mode in modes:
                    t = statistics.median(times[(mode, size)])
                    c = statistics.median(cpu[(mode, size)])
                    # Speed ratios: the router's (or copy's) time over this mode's.
                    print(
                        f"{size:>6} {mode:<12} {t:>8.3f}s {router / t:>8.2f}x "
                        f"{copy / t:>7.2f}x {c:>9.4f}"
                    )
        finally:
            for proc in procs:
                with contextlib.suppress(Exception):
                    proc.terminate()
                    proc.wait(10)
            tb.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
