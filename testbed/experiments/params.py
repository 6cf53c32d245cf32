"""The suite's parameters: command line in, one frozen `Params` out.

Pure: parsing only.  Every mistake a user can make becomes a `UsageError`
with one line of text; `__main__` prints it and exits 2.  `--quick`
changes the defaults (tiny sizes, one repetition, concurrency 2, no shaped
runs, a short cost run, a few hundred idle splices instead of 2000, shorter
keep-alive runs); flags given explicitly still win.  `--experiments`
picks the experiments to run (all by default, but for shaped and wan with
`--quick`); a `--no-...` flag takes one out either way.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

from clients.loadgen import parse_size
from testbed.impair import LinkShape
from testbed.topology import DEFAULT_PREFIX, check_prefix

SOCKS_MODES = (
    "plain",
    "endpoint",
    "spliced",
    "spliced-kernel",
    "spliced-kernel-after",
    "spliced-py",
    "dante",
    "microsocks",
)
HTTP_MODES = ("tinyproxy", "http11", "http11-copy")  # HTTP forward proxies: experiment 9 only
MODES = ("router", *SOCKS_MODES, *HTTP_MODES)

# In the order of docs/experiments.md: --experiments takes names or numbers.
EXPERIMENTS = (
    "min-load",
    "high-load",
    "throughput",
    "cost",
    "shaped",
    "wan",
    "setup-rate",
    "memory",
    "keepalive",
)

# Fig. 6.1: 1 KB to 16 MB in steps of 4, plus 64 MB.
DEFAULT_SIZES = "1K,4K,16K,64K,256K,1M,4M,16M,64M"
QUICK_SIZES = "1K,64K,1M"
DEFAULT_CONCURRENCY = "8,32,64"
DEFAULT_SHAPE = "delay=10ms loss=1%"
DEFAULT_WAN_SHAPE = "delay=10ms"
# Experiment 8: idle splices held at each step (the RSS before the first is the 0 point).
MEMORY_SPLICES = (500, 1000, 2000)
QUICK_MEMORY_SPLICES = (100, 200, 400)
# Experiment 9: sizes, GETs per connection, load-client workers; a run of one
# size moves about RUN_BYTES (at most MAX_CONNECTIONS connections per worker).
KEEPALIVE_SIZES = "1K,64K,1M,16M"
QUICK_KEEPALIVE_SIZES = "1K,64K,1M"
KEEPALIVE_REQUESTS = 10
KEEPALIVE_WORKERS = 4
KEEPALIVE_RUN_BYTES = 256 << 20
QUICK_KEEPALIVE_RUN_BYTES = 16 << 20
KEEPALIVE_MAX_CONNECTIONS = 10
QUICK_KEEPALIVE_MAX_CONNECTIONS = 3

_MAX_CONCURRENCY = 256


class UsageError(ValueError):
    """Bad command line; the message is the one line the user sees."""


@dataclass(frozen=True, slots=True)
class Params:
    modes: tuple[str, ...]
    min_load: bool  # experiment 1
    high_load: bool  # experiment 2
    throughput: bool  # experiment 3
    sizes: tuple[int, ...]  # experiment 1 (minimum load)
    load_sizes: tuple[int, ...]  # experiment 2 (high load): the sizes up to load_max_size
    concurrency: tuple[int, ...]
    repeat: int  # rounds of experiment 1 (every mode once per round)
    load_repeat: int  # rounds of experiment 2
    warmup: bool
    throughput_size: int  # experiment 3: one long transfer
    throughput_repeat: int
    cost: bool  # experiment 4
    cost_seconds: float
    shaped: bool  # experiment 5
    shape: str
    shaped_sizes: tuple[int, ...]
    wan: bool  # experiment 6: sustained throughput over a link with real delay
    wan_shape: str
    wan_size: int
    setup_rate: bool  # experiment 7: connections per second
    setup_rate_concurrency: int  # load-client workers
    setup_rate_connections: int  # requests per worker and round, back to back
    setup_rate_size: int  # the response body: tiny, so set-up is all there is
    setup_rate_repeat: int
    memory: bool  # experiment 8: the splice daemon's RSS with idle splices held
    memory_splices: tuple[int, ...]
    memory_repeat: int
    keepalive: bool  # experiment 9: K GETs per connection, through HTTP proxies too
    keepalive_sizes: tuple[int, ...]
    keepalive_requests: int  # K, per connection
    keepalive_workers: int
    keepalive_repeat: int
    keepalive_run_bytes: int  # about what one run of one size moves
    keepalive_max_connections: int  # per worker and run
    out: Path
    prefix: str
    quick: bool
    timeout: float  # per request, seconds
    family: int = 4  # 4 or 6: the address family every mode's client and origin use

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"] = str(self.out)
        return data


def parse_modes(text: str) -> tuple[str, ...]:
    names = [word.strip().lower() for word in text.split(",") if word.strip()]
    if not names:
        raise UsageError("--modes is empty: give one or more of " + ",".join(MODES))
    for name in names:
        if name not in MODES:
            raise UsageError(f"unknown mode {name!r}: choose from {','.join(MODES)}")
    return tuple(dict.fromkeys(names))  # keep the order given, drop repeats


def parse_sizes(text: str, flag: str = "--sizes") -> tuple[int, ...]:
    words = [word.strip() for word in text.split(",") if word.strip()]
    if not words:
        raise UsageError(f"{flag} is empty: give sizes such as 1K,64K,1M")
    sizes = []
    for word in words:
        try:
            size = parse_size(word)
        except ValueError as exc:
            raise UsageError(f"{flag}: {exc}") from None
        if size < 1:
            raise UsageError(f"{flag}: size {word!r} must be at least 1 byte")
        sizes.append(size)
    return tuple(sorted(set(sizes)))


def parse_experiments(text: str) -> tuple[str, ...]:
    """Experiment names or numbers (1-9), in the suite's order."""
    words = [word.strip().lower() for word in text.split(",") if word.strip()]
    if not words:
        raise UsageError("--experiments is empty: give names or numbers such as keepalive,1")
    chosen = set()
    for word in words:
        if word.isdigit() and 1 <= int(word) <= len(EXPERIMENTS):
            chosen.add(EXPERIMENTS[int(word) - 1])
        elif word in EXPERIMENTS:
            chosen.add(word)
        else:
            raise UsageError(
                f"unknown experiment {word!r}: choose from {','.join(EXPERIMENTS)} or 1-9"
            )
    return tuple(e for e in EXPERIMENTS if e in chosen)


def _count(text: str | None, flag: str, default: int, top: int) -> int:
    if text is None:
        return default
    if not text.isdigit() or not 1 <= int(text) <= top:
        raise UsageError(f"bad {flag} {text!r}: use an integer from 1 to {top}")
    return int(text)


def parse_concurrency(text: str) -> tuple[int, ...]:
    words = [word.strip() for word in text.split(",") if word.strip()]
    if not words:
        raise UsageError("--concurrency is empty: give process counts such as 8,32,64")
    values = []
    for word in words:
        if not word.isdigit() or not 1 <= int(word) <= _MAX_CONCURRENCY:
            raise UsageError(
                f"bad concurrency {word!r}: use integers from 1 to {_MAX_CONCURRENCY}, e.g. 8,32"
            )
        values.append(int(word))
    return tuple(sorted(set(values)))


def parse_shape(text: str) -> str:
    try:
        return str(LinkShape.parse(shlex.split(text)))
    except ValueError as exc:
        raise UsageError(f"--shape: {exc}") from None


def _pct(text: str) -> str:
    """argparse %-formats help strings: a shape's 'loss=1%' must be escaped."""
    return text.replace("%", "%%")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m testbed.experiments",
        description="The experiment suite: thesis chapter 6 and more, into results/<timestamp>/.",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 round: under a minute")
    p.add_argument(
        "--experiments",
        help="which to run, names or numbers (default: all; --quick: not shaped, wan): "
        + ",".join(f"{i}={name}" for i, name in enumerate(EXPERIMENTS, 1)),
    )
    p.add_argument("--modes", default=",".join(MODES), help="comma list (default: all)")
    p.add_argument("--sizes", help=f"transfer sizes, K/M = 1024^k (default {DEFAULT_SIZES})")
    p.add_argument(
        "--concurrency", help=f"high-load client processes (default {DEFAULT_CONCURRENCY})"
    )
    p.add_argument("--repeat", type=str, help="rounds per experiment (default 5; quick 1)")
    p.add_argument("--out", default="results", help="results root (default results/)")
    p.add_argument(
        "--shape", default=DEFAULT_SHAPE, help=_pct(f"shaped runs (default {DEFAULT_SHAPE!r})")
    )
    p.add_argument("--no-cost", action="store_true", help="skip the CPU-cost experiment")
    p.add_argument("--no-shaped", action="store_true", help="skip the shaped-link experiment")
    p.add_argument(
        "--wan-shape",
        default=DEFAULT_WAN_SHAPE,
        help=_pct(f"the client link for the WAN runs (default {DEFAULT_WAN_SHAPE!r})"),
    )
    p.add_argument("--no-wan", action="store_true", help="skip the WAN (delayed link) experiment")
    p.add_argument(
        "--no-setup-rate", action="store_true", help="skip the connections-per-second experiment"
    )
    p.add_argument(
        "--no-memory", action="store_true", help="skip the idle-splices-vs-daemon-RSS experiment"
    )
    p.add_argument("--no-keepalive", action="store_true", help="skip the keep-alive experiment")
    p.add_argument(
        "--keepalive-sizes",
        help=f"keep-alive sizes (default {KEEPALIVE_SIZES}; quick {QUICK_KEEPALIVE_SIZES})",
    )
    p.add_argument(
        "--keepalive-requests",
        help=f"keep-alive GETs per connection (default {KEEPALIVE_REQUESTS})",
    )
    p.add_argument(
        "--keepalive-workers",
        help=f"keep-alive load-client workers (default {KEEPALIVE_WORKERS}; quick 2)",
    )
    p.add_argument(
        "--family",
        choices=("4", "6"),
        default="4",
        help="address family of the clients, proxies and origin (default 4); with 6 the"
        " modes with no IPv6 setup here are skipped with a reason",
    )
    p.add_argument(
        "--prefix",
        "--prefix-for-tests",
        dest="prefix",
        default=DEFAULT_PREFIX,
        help=f"testbed to use (default {DEFAULT_PREFIX}); brought up and down if not up",
    )
    return p


def parse_args(argv: Sequence[str]) -> Params:
    """The suite's parameters from its command line; raises UsageError."""
    args = build_parser().parse_args(list(argv))
    quick: bool = args.quick
    modes = parse_modes(args.modes)
    if args.experiments is not None:
        chosen = set(parse_experiments(args.experiments))
    else:
        chosen = set(EXPERIMENTS) - ({"shaped", "wan"} if quick else set())
    for name in EXPERIMENTS:  # --no-cost, --no-setup-rate, ...: named after them
        if getattr(args, "no_" + name.replace("-", "_"), False):
            chosen.discard(name)
    keepalive_sizes = parse_sizes(
        args.keepalive_sizes or (QUICK_KEEPALIVE_SIZES if quick else KEEPALIVE_SIZES),
        "--keepalive-sizes",
    )
    keepalive_requests = _count(
        args.keepalive_requests, "--keepalive-requests", KEEPALIVE_REQUESTS, 1000
    )
    keepalive_workers = _count(
        args.keepalive_workers,
        "--keepalive-workers",
        2 if quick else KEEPALIVE_WORKERS,
        _MAX_CONCURRENCY,
    )
    sizes = parse_sizes(args.sizes or (QUICK_SIZES if quick else DEFAULT_SIZES))
    concurrency = parse_concurrency(args.concurrency or ("2" if quick else DEFAULT_CONCURRENCY))
    if args.repeat is None:
        repeat = 1 if quick else 5
    elif not args.repeat.isdigit() or not 1 <= int(args.repeat) <= 1000:
        raise UsageError(f"bad --repeat {args.repeat!r}: use an integer from 1 to 1000")
    else:
        repeat = int(args.repeat)
    shape = parse_shape(args.shape)
    wan_shape = parse_shape(args.wan_shape)
    try:
        prefix = check_prefix(args.prefix)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    load_max = (64 << 10) if quick else (1 << 20)
    shaped_max = 1 << 20
    return Params(
        modes=modes,
        min_load="min-load" in chosen,
        high_load="high-load" in chosen,
        throughput="throughput" in chosen,
        sizes=sizes,
        load_sizes=tuple(s for s in sizes if s <= load_max) or sizes[:1],
        concurrency=concurrency,
        repeat=repeat,
        load_repeat=max(1, min(repeat, 3)),
        warmup=True,
        throughput_size=(4 << 20) if quick else (256 << 20),
        throughput_repeat=max(1, min(repeat, 3)),
        cost="cost" in chosen,
        cost_seconds=1.5 if quick else 5.0,
        shaped="shaped" in chosen,
        shape=shape,
        shaped_sizes=tuple(s for s in sizes if s <= shaped_max) or sizes[:1],
        wan="wan" in chosen,
        wan_shape=wan_shape,
        wan_size=32 << 20,
        setup_rate="setup-rate" in chosen,
        setup_rate_concurrency=4 if quick else 8,
        setup_rate_connections=25 if quick else 100,
        setup_rate_size=1,
        setup_rate_repeat=max(1, min(repeat, 3)),
        memory="memory" in chosen,
        memory_splices=QUICK_MEMORY_SPLICES if quick else MEMORY_SPLICES,
        memory_repeat=max(1, min(repeat, 3)),
        keepalive="keepalive" in chosen,
        keepalive_sizes=keepalive_sizes,
        keepalive_requests=keepalive_requests,
        keepalive_workers=keepalive_workers,
        keepalive_repeat=max(1, min(repeat, 3)),
        keepalive_run_bytes=QUICK_KEEPALIVE_RUN_BYTES if quick else KEEPALIVE_RUN_BYTES,
        keepalive_max_connections=(
            QUICK_KEEPALIVE_MAX_CONNECTIONS if quick else KEEPALIVE_MAX_CONNECTIONS
        ),
        out=Path(args.out),
        prefix=prefix,
        quick=quick,
        timeout=10.0 if quick else 120.0,
        family=int(args.family),
    )
