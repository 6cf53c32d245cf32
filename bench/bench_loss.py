"""Downloads over a lossy link where the daemon is the sender: RFC 6675 against NewReno.

Builds two private testbeds, one daemon with SACK-based loss recovery (the
default) and one with ``--no-sack-recovery`` (NewReno, RFC 6582: what the
daemon did before), puts LOSS (and DELAY) on the client-proxy link of each,
and downloads SIZE bytes from the origin with curl through the endpoint
SOCKS5 proxy, where the daemon's own TCP sends every byte to the client;
the router and the plain (kernel TCP) SOCKS5 proxy on the same links for
reference.  Rounds interleaved; every body is SHA-256 checked.  Prints the
median seconds per mode and the ratio to the router.

With ``--ecn`` the link CE-marks ECN-capable packets instead of dropping
them (netem's ``ecn``) and the client asks for ECN (tcp_ecn=1): the
daemon's sender then meets most congestion as ECN-Echo (RFC 3168), not
loss; the spliced SOCKS5 is run too, ECN crossing the splice.

    sudo .venv/bin/python -m bench.bench_loss [--loss 2%] [--delay 5ms]
        [--size 64M] [--repeat 3] [--ecn] [--congestion reno]

The kernel senders (the origin for the router, the plain SOCKS5 toward the
client) use their namespace's default congestion control, which new
namespaces inherit from the host (BBR on this project's machine): BBR does
not take random loss for congestion, so against the daemon's loss-based
Reno it compares unlike with unlike.  ``--congestion reno`` sets the
server's and the proxy's default, so every sender answers loss the same
way (a namespace may set only what net.ipv4.tcp_allowed_congestion_control
allows: reno and bbr here, not cubic).

A benchmark, not a test: tests/test_tcp_sack.py and the endpoint's loss
test check the behaviour.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import time

from testbed.net import Testbed
from tests.helpers import curl_sha256, pattern_sha256


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loss", default="2%")
    ap.add_argument("--delay", default="5ms")
    ap.add_argument("--size", default="64M")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ecn", action="store_true", help="mark instead of drop; clients ask for ECN")
    ap.add_argument(
        "--congestion", metavar="ALGO", help="the kernel senders' congestion control (reno, cubic)"
    )
    args = ap.parse_args()
    size = _size(args.size)
    tag = secrets.token_hex(2)
    sysctls: dict[str, dict[str, str | int]] = {"client": {"ecn": 1}} if args.ecn else {}
    if args.congestion:
        for role in ("server", "proxy"):
            sysctls.setdefault(role, {})["net.ipv4.tcp_congestion_control"] = args.congestion
    sack = Testbed("ls" + tag, msl=1.0, sysctls=sysctls)
    reno = Testbed("lr" + tag, msl=1.0, daemon_args=("--no-sack-recovery",), sysctls=sysctls)
    shape = f"loss={args.loss} delay={args.delay}" + (" ecn" if args.ecn else "")
    times: dict[str, list[float]] = {}
    senders = "?"
    try:
        for bed in (sack, reno):
            bed.up()
            bed.link("client-proxy").shape(shape)
        senders = sack.host("server").sysctl("net.ipv4.tcp_congestion_control")
        url = "http://{}:{}/bytes/{}"
        for rnd in range(args.repeat):
            runs = [
                ("router", sack, []),
                ("plain", sack, ["--socks5", "{}:{}".format(*sack.socks)]),
                ("endpoint-rfc6675", sack, ["--socks5", "{}:{}".format(*sack.endpoint_socks)]),
                ("endpoint-newreno", reno, ["--socks5", "{}:{}".format(*reno.endpoint_socks)]),
            ]
            if args.ecn:
                runs.append(("spliced", sack, ["--socks5", "{}:{}".format(*sack.spliced_socks)]))
            for name, bed, proxy in runs:
                t0 = time.monotonic()
                rc, digest = curl_sha256(
                    bed.host("client"), url.format(*bed.origin, size), *proxy, timeout=600
                )
                took = time.monotonic() - t0
                ok = rc == 0 and digest == pattern_sha256(size)
                print(f"round {rnd} {name}: {took:.2f} s{'' if ok else ' FAILED'}", flush=True)
                if ok:
                    times.setdefault(name, []).append(took)
    finally:
        for bed in (sack, reno):
            bed.down()
    print(
        f"\n{args.size} download, client-proxy link {shape}, median of {args.repeat};"
        f" kernel senders {senders}, the daemon's NewReno/RFC 6675:"
    )
    router = statistics.median(times.get("router", [float("nan")]))
    for name, samples in times.items():
        med = statistics.median(samples)
        print(
            f"  {name:18s} {med:7.2f} s  {size / med / 1e6:7.1f} MB/s  x router {router / med:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
