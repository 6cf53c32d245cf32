"""The suite's parameters: command line in, one frozen `Params` out.

Pure: parsing only.  Every mistake a user can make becomes a `UsageError`
with one line of text; `__main__` prints it and exits 2.  `--quick`
changes the defaults (tiny sizes, one repetition, concurrency 2, no shaped
runs, a short cost run, a few hundred idle splices instead of 2000); flags
given explicitly still win.
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

MODES = ("router", "plain", "endpoint", "spliced", "spliced-py", "dante", "microsocks")

# Fig. 6.1: 1 KB to 16 MB in steps of 4, plus 64 MB.
DEFAULT_SIZES = "1K,4K,16K,64K,256K,1M,4M,16M,64M"
QUICK_SIZES = "1K,64K,1M"
DEFAULT_CONCURRENCY = "8,32,64"
DEFAULT_SHAPE = "delay=10ms loss=1%"
DEFAULT_WAN_SHAPE = "delay=10ms"
# Experiment 8: idle splices held at each step (the RSS before the first is the 0 point).
MEMORY_SPLICES = (500, 1000, 2000)
QUICK_MEMORY_SPLICES = (100, 200, 400)

_MAX_CONCURRENCY = 256


class UsageError(ValueError):
    """Bad command line; the message is the one line the user sees."""


@dataclass(frozen=True, slots=True)
class Params:
    modes: tuple[str, ...]
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
    out: Path
    prefix: str
    quick: bool
    timeout: float  # per request, seconds

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
        sizes=sizes,
        load_sizes=tuple(s for s in sizes if s <= load_max) or sizes[:1],
        concurrency=concurrency,
        repeat=repeat,
        load_repeat=max(1, min(repeat, 3)),
        warmup=True,
        throughput_size=(4 << 20) if quick else (256 << 20),
        throughput_repeat=max(1, min(repeat, 3)),
        cost=not args.no_cost,
        cost_seconds=1.5 if quick else 5.0,
        shaped=not (args.no_shaped or quick),
        shape=shape,
        shaped_sizes=tuple(s for s in sizes if s <= shaped_max) or sizes[:1],
        wan=not (args.no_wan or quick),
        wan_shape=wan_shape,
        wan_size=32 << 20,
        setup_rate=not args.no_setup_rate,
        setup_rate_concurrency=4 if quick else 8,
        setup_rate_connections=25 if quick else 100,
        setup_rate_size=1,
        setup_rate_repeat=max(1, min(repeat, 3)),
        memory=not args.no_memory,
        memory_splices=QUICK_MEMORY_SPLICES if quick else MEMORY_SPLICES,
        memory_repeat=max(1, min(repeat, 3)),
        out=Path(args.out),
        prefix=prefix,
        quick=quick,
        timeout=10.0 if quick else 120.0,
    )
