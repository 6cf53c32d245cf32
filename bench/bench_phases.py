"""Where a short request's time goes, per proxy: four phases read from captures.

Run as root with the testbed up (``make testbed up``), from the repo root:

    .venv/bin/python -m bench.bench_phases [--requests 40] [--size 1024] [--ports 1080,1081]

For each SOCKS5 port on the proxy host's client-side address (1080: the
plain copying proxy; 1081: the kernel SOCKS5, which has the daemon splice
each pair at once; any port another proxy was started on), N sequential
curl downloads of /bytes/SIZE from the origin, captured on both of the proxy
host's links (at the client's and at the origin's end).  Per request, four
instants: the client's request (its third data segment: greeting, CONNECT,
then the HTTP request) arriving at the proxy host, leaving it toward the
origin, the origin's first data segment arriving, and leaving toward the
client.  Prints the median of each phase and of the total, and each port's
total over the first port's, all from one run (docs/architecture.md,
"Connection setup", round six).  A request whose instants are not in that
order (a retransmission, a capture that missed one) is counted, not used.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from testbed.net import Testbed
from testbed.pcap import Frame, tcp_frames
from testbed.topology import DEFAULT_PREFIX


@dataclass
class Phases:
    request_in: float
    request_out: float
    answer_in: float
    answer_out: float

    def ordered(self) -> bool:
        return self.request_in <= self.request_out <= self.answer_in <= self.answer_out


def _by_connection(frames: list[Frame], local_port: int) -> list[list[Frame]]:
    """The frames of each connection, in the order their SYNs were captured.

    A connection is named by its port on the side that is not ``local_port``
    (the client's port on the client link, the proxy host's on the server
    link); ``local_port`` is the well-known one of the two.
    """
    conns: dict[int, list[Frame]] = {}
    for f in frames:
        port = f.sport if f.dport == local_port else f.dport
        conns.setdefault(port, []).append(f)
    return sorted(conns.values(), key=lambda fs: fs[0].time)


def _data_from(frames: list[Frame], port: int) -> list[Frame]:
    return [f for f in frames if f.sport == port and f.payload_len > 0]


def phases(client_link: list[Frame], server_link: list[Frame], proxy_port: int) -> list[Phases]:
    """Pair the i-th client connection with the i-th connection to the origin."""
    out = []
    clients = _by_connection(client_link, proxy_port)
    servers = _by_connection(server_link, 80)
    for c, s in zip(clients, servers, strict=False):
        from_client = [f for f in c if f.dport == proxy_port and f.payload_len > 0]
        if len(from_client) < 3:
            continue
        request_in = from_client[2].time
        to_client = [f for f in _data_from(c, proxy_port) if f.time > request_in]
        to_origin = [f for f in s if f.dport == 80 and f.payload_len > 0]
        from_origin = _data_from(s, 80)
        if not (to_client and to_origin and from_origin):
            continue
        out.append(Phases(request_in, to_origin[0].time, from_origin[0].time, to_client[0].time))
    return out


def measure(tb: Testbed, port: int, requests: int, size: int, work: Path) -> list[Phases]:
    proxy = tb.host("proxy").addr
    origin, origin_port = tb.origin
    client_ns = tb.host("client").ns
    c_path, s_path = work / f"c{port}.pcap", work / f"s{port}.pcap"
    c_link, s_link = tb.link("client-proxy"), tb.link("proxy-server")
    c_cap = c_link.capture(c_path, side="client", snaplen=128, bpf=f"tcp port {port}")
    s_cap = s_link.capture(s_path, side="server", snaplen=128, bpf="tcp port 80")
    curl = ["ip", "netns", "exec", client_ns, "curl", "-s", "-o", "/dev/null", "--max-time", "10"]
    url = f"http://{origin}:{origin_port}/bytes/{size}"
    try:
        for _ in range(requests):
            subprocess.run([*curl, "--socks5", f"{proxy}:{port}", url], check=True)
    finally:
        c_cap.stop()
        s_cap.stop()
    return phases(tcp_frames(c_path), tcp_frames(s_path), port)


def _us(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1e6:6.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--ports", default="1080,1081", help="SOCKS5 ports; the first is the base")
    ap.add_argument("--prefix", default=DEFAULT_PREFIX)
    args = ap.parse_args()
    tb = Testbed(prefix=args.prefix)
    ports = [int(p) for p in args.ports.split(",")]
    print(f"{args.requests} sequential {args.size}-byte downloads per port; medians in us")
    print("port  used  request across  origin  answer across   total  total/first")
    first: float | None = None
    with tempfile.TemporaryDirectory() as tmp:
        for port in ports:
            ps = measure(tb, port, args.requests, args.size, Path(tmp))
            used = [p for p in ps if p.ordered()]
            if not used:
                print(f"{port:5d}  none of {len(ps)} requests were captured in order")
                continue
            total = statistics.median(p.answer_out - p.request_in for p in used)
            first = total if first is None else first
            print(
                f"{port:5d}  {len(used):4d}  "
                f"{_us([p.request_out - p.request_in for p in used]):>14}  "
                f"{_us([p.answer_in - p.request_out for p in used]):>6}  "
                f"{_us([p.answer_out - p.answer_in for p in used]):>13}  "
                f"{total * 1e6:6.0f}  {total / first:11.2f}"
            )


if __name__ == "__main__":
    main()
