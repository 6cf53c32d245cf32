"""`python -m testbed up|down|status|exec|shape|capture`: the testbed's command line.

Every failure a user can cause (not root, an unknown host or link, a bad
shape word, a service that cannot start) ends with one clear line on stderr
and exit status 2; nothing prints a traceback at them.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Sequence

from testbed.net import TCP_SYSCTLS, Testbed, TestbedError
from testbed.topology import DEFAULT_PREFIX, THESIS


def _parse_mtu(values: Sequence[str]) -> dict[str, int]:
    mtu: dict[str, int] = {}
    for item in values:
        name, sep, num = item.partition("=")
        if not sep or not num.isdigit() or not 68 <= int(num) <= 65535:
            raise TestbedError(
                f"bad --mtu {item!r}: expected LINK=68..65535, e.g. client-proxy=9000"
            )
        mtu[name] = int(num)
    return mtu


def _parse_sysctls(values: Sequence[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for item in values:
        host, sep, rest = item.partition(":")
        key, sep2, value = rest.partition("=")
        if not sep or not sep2 or not key or not value:
            aliases = ", ".join(TCP_SYSCTLS)
            raise TestbedError(
                f"bad --sysctl {item!r}: expected HOST:KEY=VALUE, e.g. client:sack=0"
                f" (aliases: {aliases})"
            )
        out.setdefault(host, {})[key] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m testbed", description=__doc__.splitlines()[0])
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="name prefix of namespaces and links")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build the topology and start the services (idempotent)")
    up.add_argument("--mtu", action="append", default=[], metavar="LINK=MTU")
    up.add_argument("--sysctl", action="append", default=[], metavar="HOST:KEY=VALUE")
    up.add_argument("--no-services", action="store_true", help="only the namespaces and links")
    up.add_argument(
        "--fastpath",
        choices=("auto", "on", "off"),
        default="auto",
        help="the splice daemon's kernel fast path (auto: on where BPF works)",
    )
    sub.add_parser("down", help="remove exactly what `up` made")
    st = sub.add_parser("status", help="what exists and what runs")
    st.add_argument("--json", action="store_true")
    ex = sub.add_parser("exec", help="run a command in a host: exec HOST -- CMD ...")
    ex.add_argument("host", choices=[h.role for h in THESIS.hosts])
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    sh = sub.add_parser("shape", help="impair a link: shape LINK delay=10ms loss=1%% ... | clear")
    sh.add_argument("link")
    sh.add_argument("words", nargs="*", help="netem-like words, or `clear`")
    cap = sub.add_parser("capture", help="tcpdump a link into a pcap file")
    cap.add_argument("link")
    cap.add_argument("--out", required=True)
    cap.add_argument("--side", help="host whose end of the link to capture on (default proxy)")
    cap.add_argument("--seconds", type=float, help="stop after this long (default: Ctrl-C)")
    cap.add_argument("--snaplen", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (TestbedError, ValueError, KeyError, OSError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"testbed: {msg}", file=sys.stderr)
        return 2
    except Exception as exc:  # e.g. a service that did not start: say what, not where
        print(f"testbed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "up":
        tb = Testbed(
            args.prefix,
            mtu=_parse_mtu(args.mtu),
            sysctls=_parse_sysctls(args.sysctl),
            services=not args.no_services,
            fastpath=args.fastpath,
        )
        was_up = tb.is_up()
        done = tb.up()
        if was_up and not done:
            print(f"testbed {tb.prefix!r} is already up; nothing to repair")
        elif was_up:
            print("repaired: " + ", ".join(done))
        print(tb.describe())
        return 0
    tb = Testbed(args.prefix)
    if args.command == "down":
        done = tb.down()
        print("\n".join(done) if done else f"testbed {tb.prefix!r} is not up; nothing to remove")
        return 0
    if args.command == "status":
        info = tb.status()
        if args.json:
            print(json.dumps(info, indent=1))
        else:
            _print_status(info)
        return 0 if info["up"] else 1
    if not tb.is_up():
        raise TestbedError(f"testbed {tb.prefix!r} is not up: run `make testbed up` first")
    if args.command == "exec":
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not argv:
            raise TestbedError("exec needs a command: exec HOST -- CMD ...")
        proc = tb.host(args.host).popen(argv)
        return proc.wait()
    if args.command == "shape":
        link = tb.link(args.link)
        if args.words in ([], ["clear"]):
            link.clear()
            print(f"{link.name}: cleared")
        else:
            link.shape(args.words)
            shape, _ = link.shape_status()
            print(f"{link.name}: {shape}")
        return 0
    if args.command == "capture":
        cap = tb.link(args.link).capture(args.out, side=args.side, snaplen=args.snaplen)
        print(f"capturing {args.link} into {args.out} (Ctrl-C to stop)", file=sys.stderr)
        try:
            if args.seconds is not None:
                time.sleep(args.seconds)
            else:
                signal.pause()
        except KeyboardInterrupt:
            pass
        finally:
            cap.stop()
        return 0
    raise TestbedError(f"unknown command {args.command!r}")


def _print_status(info: dict[str, object]) -> None:
    print(f"testbed {info['prefix']!r}: {'up' if info['up'] else 'down'}")
    hosts = info["hosts"]
    assert isinstance(hosts, dict)
    for role, h in hosts.items():
        mark = "ok" if h["present"] else "MISSING"
        print(f"  host {role:<7} {h['namespace']:<22} {' | '.join(h['addresses']):<28} {mark}")
    links = info["links"]
    assert isinstance(links, dict)
    for name, entry in links.items():
        mark = "ok" if entry["present"] else "MISSING"
        shape = entry.get("shape") or "unshaped"
        print(f"  link {name:<13} {entry['wire']:<22} {shape:<28} {mark}")
    services = info["services"]
    assert isinstance(services, dict)
    for name, s in services.items():
        state = "running" if s["alive"] else "DEAD"
        print(f"  service {name:<8} pid {s['pid']:<7} {state}  log {s['log']}")
