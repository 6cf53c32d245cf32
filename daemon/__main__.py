"""`python -m daemon`: run the splice daemon in the current network namespace.

It creates the TUN, brings it up and routes the splice prefix into it
(DESIGN.md: those addresses must not be local to this namespace), opens the
Unix socket API, prints ``ready`` and serves until SIGTERM/SIGINT (every
connection reset) or SIGUSR1 (the same, but splices in the kernel fast path
keep flowing for the next daemon to adopt: docs/operations.md).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from pyroute2 import IPRoute

from daemon.api.server import SocketPathInUse
from daemon.fastpath import DEFAULT_OBJECT, FastPathUnavailable
from daemon.io.daemon import Daemon, DaemonConfig
from daemon.io.tun import configure_tun
from daemon.tcp.config import TcpConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m daemon",
        description=__doc__.splitlines()[0],
        epilog="Signals: SIGTERM/SIGINT stop and reset every connection; SIGUSR1 stops but"
        " leaves the splices in the kernel fast path flowing, for the next daemon to adopt.",
    )
    p.add_argument("--tun", default="tsplice0", help="TUN interface name")
    p.add_argument("--prefix", default="198.51.100.0/24", help="addresses the daemon terminates")
    p.add_argument(
        "--source", default="198.51.100.2", help="default source of outgoing connections"
    )
    p.add_argument(
        "--prefix6",
        default=None,
        help="IPv6 addresses the daemon terminates too (endpoint connections; no splice yet)",
    )
    p.add_argument("--source6", default=None, help="default source of outgoing IPv6 connections")
    p.add_argument("--socket", default="/run/tcp-splice/spliced.sock", help="API socket path")
    p.add_argument("--socket-mode", default="0660", help="API socket permissions (octal)")
    p.add_argument("--socket-group", default=None, help="group owning the API socket")
    p.add_argument("--mss", type=int, default=1460, help="MSS we advertise")
    p.add_argument(
        "--rcv-wscale",
        type=int,
        default=7,
        help="receive window scale we offer on accepted connections; -1 = no option",
    )
    p.add_argument("--msl", type=float, default=30.0, help="MSL in seconds (TIME-WAIT = 2 MSL)")
    p.add_argument("--rcv-buf", type=int, default=1 << 20, help="per-connection receive buffer")
    p.add_argument("--snd-buf", type=int, default=1 << 20, help="per-connection send buffer")
    p.add_argument(
        "--max-server-ack-delay",
        type=float,
        default=0.25,
        help="a splice's server side acks nothing sooner than the client's RTT, at most this (s)",
    )
    p.add_argument(
        "--client-ack-delay",
        type=float,
        default=0.0,
        help="accepted connections ack nothing received less than this ago (s): for"
        " proxies whose servers are far, so that clients do not time the short proxy link",
    )
    p.add_argument(
        "--syn-backlog",
        type=int,
        default=256,
        help="half-open connections per listener; beyond them SYNs get SYN cookies",
    )
    p.add_argument(
        "--no-syn-cookies",
        action="store_true",
        help="drop SYNs beyond --syn-backlog instead of answering with SYN cookies (RFC 4987)",
    )
    p.add_argument(
        "--no-sack-recovery",
        action="store_true",
        help="ignore the SACK blocks peers send (NewReno recovery, RFC 6582) instead of RFC 6675;"
        " SACK is still negotiated and advertised (for A/B measurements)",
    )
    p.add_argument(
        "--no-ecn",
        action="store_true",
        help="neither request nor accept ECN (RFC 3168); spliced flows then carry none either",
    )
    p.add_argument("--no-offload", action="store_true", help="plain TUN (no GSO/checksum offload)")
    p.add_argument(
        "--fastpath",
        choices=("auto", "on", "off"),
        default="auto",
        help="kernel fast path for spliced flows (tc eBPF); auto falls back to Python",
    )
    p.add_argument(
        "--fastpath-object",
        type=Path,
        default=DEFAULT_OBJECT,
        help="the compiled program (make fastpath)",
    )
    p.add_argument("--log-level", default="info")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.syn_backlog < 0:
        parser.error("--syn-backlog must be 0 or more")
    for option, text, version in (
        ("--prefix", args.prefix, 4),
        ("--source", args.source, 4),
        ("--prefix6", args.prefix6, 6),
        ("--source6", args.source6, 6),
    ):
        if text is None:
            continue
        try:
            parsed = (ipaddress.ip_network if "prefix" in option else ipaddress.ip_address)(text)
        except ValueError as exc:
            parser.error(f"{option}: {exc}")
        if parsed.version != version:
            parser.error(f"{option}: {text} is not an IPv{version} address")
    if args.source6 is not None and args.prefix6 is None:
        parser.error("--source6 needs --prefix6")
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    tcp = TcpConfig(
        mss=args.mss,
        rcv_wscale=None if args.rcv_wscale < 0 else args.rcv_wscale,
        msl=args.msl,
        rcv_buf=args.rcv_buf,
        snd_buf=args.snd_buf,
        min_ack_delay=args.client_ack_delay,
        syn_backlog=args.syn_backlog,
        syn_cookies=not args.no_syn_cookies,
        sack_recovery=not args.no_sack_recovery,
        ecn=not args.no_ecn,
    )
    cfg = DaemonConfig(
        tun_name=args.tun,
        socket_path=args.socket,
        socket_mode=int(args.socket_mode, 8),
        socket_group=args.socket_group,
        prefix=args.prefix,
        source=args.source,
        prefix6=args.prefix6,
        source6=args.source6,
        offload=not args.no_offload,
        tcp=tcp,
        fastpath=args.fastpath,
        max_server_ack_delay=args.max_server_ack_delay,
        fastpath_object=args.fastpath_object,
    )
    try:
        daemon = Daemon(cfg)
    except SocketPathInUse as exc:
        print(f"daemon: {exc}", file=sys.stderr)
        return 1
    except FastPathUnavailable as exc:
        print(f"daemon: --fastpath on, but the fast path cannot run: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"daemon: cannot start: {exc}", file=sys.stderr)
        return 1
    with IPRoute() as ipr:
        routes = [cfg.prefix, *([cfg.prefix6] if cfg.prefix6 else [])]
        configure_tun(ipr, cfg.tun_name, mtu=cfg.mtu, routes=routes)

    handover = False

    def stop(signum: int, frame: object) -> None:
        nonlocal handover
        # SIGUSR1: stop, but leave the kernel's splices to the next daemon.
        handover = handover or signum == signal.SIGUSR1
        daemon.stopping = True

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, stop)
    print("ready", flush=True)
    try:
        daemon.run()
    finally:
        daemon.terminate(handover)
    return 0


if __name__ == "__main__":
    sys.exit(main())
