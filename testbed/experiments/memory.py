"""Experiment 8: the splice daemon's memory with N idle splices held open.

A holder process in the client namespace opens SOCKS5 CONNECTs through a
spliced proxy to the origin's raw sink (64 at a time).  The sink reads until
EOF and sends nothing, so each connection becomes a splice that stays open
and idle.  Per round the holder grows to each step of N in turn, the
daemon's VmRSS is read at each, then every connection is closed and the
daemon must return to the connection and splice counts it had before the
round (asked over its API) before the next round or experiment starts.

KiB per splice is the slope of a least-squares line through a round's
(splices, RSS) points.  Rounds after the first reuse the memory the first
one freed (Python keeps its arenas) and their slopes read near zero: round
1's slope is the cost of an idle splice, and the RSS left after each round,
which must not keep rising, is the leak check.  The rounds are plotted apart,
never averaged.

`bench.bench_splice_memory` drives the same holder on a private testbed.
"""

from __future__ import annotations

import json
import math
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from daemon.api.client import SpliceClient
from testbed.experiments.modes import Mode, stop_group

# The holder: a line "N" on stdin grows it to N connections (failed ones are
# counted, not retried) and it answers one JSON line; "close" (or EOF) closes
# them all.  Error codes are the load client's, so the report names them alike.
HOLDER = r"""
import json, resource, socket, sys
from concurrent.futures import ThreadPoolExecutor
from clients.loadgen import classify
from clients.socks5 import socks5_connect
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
proxy, sink = (sys.argv[1], int(sys.argv[2])), (sys.argv[3], int(sys.argv[4]))
def code(err):
    try:
        return classify(err)
    except BaseException:
        return type(err).__name__
def one(_):
    s = None
    try:
        s = socket.create_connection(proxy, timeout=10)
        socks5_connect(s, *sink)
        return s, None
    except Exception as err:
        if s is not None:
            s.close()
        return None, code(err)
held, failed = [], {}
with ThreadPoolExecutor(64) as pool:
    while (word := sys.stdin.readline().strip()) not in ("", "close"):
        for s, err in pool.map(one, range(max(int(word) - len(held), 0))):
            if s is None:
                failed[err] = failed.get(err, 0) + 1
            else:
                held.append(s)
        print(json.dumps({"held": len(held), "failed": failed}), flush=True)
for s in held:
    s.close()
print(json.dumps({"closed": len(held)}), flush=True)
"""


class HolderError(RuntimeError):
    """The holder died, or did not answer in time."""


def rss_kib(pid: int) -> int:
    """VmRSS of `pid` in KiB (/proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Holder:
    """The holder process in `host`, through `proxy` to `sink`; stop() it in a finally."""

    def __init__(self, host: Any, proxy: tuple[str, int], sink: tuple[str, int]) -> None:
        argv = [sys.executable, "-c", HOLDER, *map(str, proxy), *map(str, sink)]
        self.proc = host.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        # A thread reads the answers, so a hung holder costs a timeout, not the run.
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()

    def _read(self, out: IO[str]) -> None:
        for line in out:
            self._lines.put(line)
        self._lines.put(None)

    def _ask(self, word: str, timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(word + "\n")
            self.proc.stdin.flush()
            line = self._lines.get(timeout=timeout)
        except (OSError, queue.Empty):
            line = None
        if line is None:
            raise HolderError(f"the holder did not answer {word!r} within {timeout:.0f} s")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def hold(self, target: int, timeout: float | None = None) -> tuple[int, dict[str, int]]:
        """Grow to `target` connections; (held, failures by error code so far).

        By default it waits as long as the holder may take: 64 connections at a
        time, each bounded by its 10 s timeout, and some slack.
        """
        if timeout is None:
            timeout = 10.0 * (target / 64 + 2)
        answer = self._ask(str(target), timeout)
        return int(answer["held"]), {str(k): int(v) for k, v in answer["failed"].items()}

    def close(self, timeout: float = 30.0) -> int:
        """Close every held connection and let the holder exit; how many it closed."""
        closed = int(self._ask("close", timeout)["closed"])
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise HolderError(f"the holder did not exit within {timeout:.0f} s") from None
        return closed

    def stop(self) -> None:
        stop_group(self.proc)


def idle_splices(stats: Mapping[str, Any]) -> int:
    """Splices in the daemon's stats that are spliced on both sides and never carried a byte."""
    return sum(
        1
        for s in stats.get("splices", ())
        if s.get("client_state") == "SPLICED"
        and s.get("server_state") == "SPLICED"
        and not s.get("bytes_c2s")
        and not s.get("bytes_s2c")
    )


def counts(stats: Mapping[str, Any]) -> tuple[int, int]:
    """(connections, splices) the daemon holds: what must return to baseline."""
    return int(stats.get("connections", 0)), len(stats.get("splices", ()))


def fit_slope(points: Sequence[tuple[int, int]]) -> float:
    """Least-squares slope of y over x; NaN with fewer than two distinct x."""
    xs = [float(x) for x, _ in points]
    if len(set(xs)) < 2:
        return math.nan
    mx = sum(xs) / len(xs)
    my = sum(float(y) for _, y in points) / len(points)
    sxy = sum((x - mx) * (y - my) for x, (_, y) in zip(xs, points, strict=True))
    sxx = sum((x - mx) ** 2 for x in xs)
    return sxy / sxx


@dataclass(frozen=True, slots=True)
class MemoryRound:
    """One round on one daemon: VmRSS as the idle splices grow, and after they close."""

    mode: str
    round: int
    points: tuple[tuple[int, int], ...]  # (idle splices held, VmRSS KiB); first (0, before)
    after_kib: int | None  # once closed and back to the baseline counts (None: never read)
    failed: int  # CONNECTs that did not become held connections
    errors: dict[str, int] = field(default_factory=dict)
    daemon_idle: int = 0  # idle splices the daemon listed at the largest step
    settled: bool = False  # the daemon returned to its baseline counts after the close
    note: str = ""

    @property
    def held(self) -> int:
        return self.points[-1][0] if self.points else 0

    @property
    def kib_per_splice(self) -> float:
        return fit_slope(self.points)

    @property
    def before_kib(self) -> int | None:
        return self.points[0][1] if self.points else None


def _wait_baseline(
    api: SpliceClient, base: tuple[int, int], timeout: float, poll: float = 0.5
) -> tuple[bool, tuple[int, int]]:
    """Poll stats until connections and splices are back to `base` (or fewer)."""
    deadline = time.monotonic() + timeout
    while True:
        now = counts(api.stats())
        if now[0] <= base[0] and now[1] <= base[1]:
            return True, now
        if time.monotonic() > deadline:
            return False, now
        time.sleep(poll)


def run_round(
    tb: Any,
    mode: Mode,
    steps: Sequence[int],
    rnd: int,
    *,
    settle: float = 1.0,
    baseline_timeout: float = 90.0,
) -> MemoryRound:
    """Hold `steps` idle splices in turn through `mode`; close; wait for the baseline.

    Never raises for what the daemon or the holder does wrong: it ends up in
    the round's failures, `settled` and `note`, which the report shows.
    """
    assert mode.splice_daemon is not None and mode.socks is not None
    pid, sock = mode.splice_daemon.pid, mode.splice_daemon.socket
    points: list[tuple[int, int]] = []
    failed: dict[str, int] = {}
    daemon_idle, settled, after, note = 0, False, None, ""
    with SpliceClient(str(sock)) as api:
        start = api.stats()
        base, base_idle = counts(start), idle_splices(start)
        points.append((0, rss_kib(pid)))
        holder = Holder(tb.host("client"), mode.socks, tb.sink)
        try:
            for target in steps:
                held, failed = holder.hold(target)
                # Let the last splices finish: the client's delayed ACK of the
                # CONNECT reply completes them, then the proxy lets go of the fds.
                time.sleep(settle)
                points.append((held, rss_kib(pid)))
            daemon_idle = idle_splices(api.stats()) - base_idle
            holder.close()
        except HolderError as err:
            note = str(err)
        finally:
            holder.stop()  # closes whatever it still held
        settled, left = _wait_baseline(api, base, baseline_timeout)
        if not settled:
            note = (note + "; " if note else "") + (
                f"the daemon still had {left[0]} connections and {left[1]} splices"
                f" {baseline_timeout:.0f} s after the close (baseline {base[0]} and {base[1]})"
            )
        after = rss_kib(pid)
    return MemoryRound(
        mode=mode.name,
        round=rnd,
        points=tuple(points),
        after_kib=after,
        failed=sum(failed.values()),
        errors=dict(sorted(failed.items())),
        daemon_idle=daemon_idle,
        settled=settled,
        note=note,
    )


@dataclass(frozen=True, slots=True)
class MemorySummary:
    """One daemon over its rounds.

    Round 1's slope is the memory an idle splice costs: later rounds reuse
    what round 1 freed (Python keeps its arenas) and read near zero, so a
    median over rounds would hide the cost.  What later rounds tell is
    whether the daemon keeps more after every round (a leak): `retained_kib`,
    the RSS after closing in the last round minus in round 1 (round 1's own
    includes what tearing down 2000 splices allocates, once).
    """

    mode: str
    rounds: int
    held: int  # the largest step reached (minimum over rounds)
    kib_per_splice: float  # round 1's slope
    over_start: tuple[float, float]  # per round (RSS at most held - round 1's start) / held
    retained_kib: int | None  # RSS after closing: last round minus round 1 (None: one round)
    failed: int
    unsettled: int  # rounds after which the daemon did not return to its baseline


def summarize(rounds: Sequence[MemoryRound], modes: Sequence[str]) -> list[MemorySummary]:
    """Per mode, in `modes` order."""
    out = []
    for mode in modes:
        mine = sorted((r for r in rounds if r.mode == mode and r.points), key=lambda r: r.round)
        if not mine:
            continue
        first = mine[0]
        start = first.points[0][1]
        # The bench's measure (bench_splice_memory: "per splice over the start"):
        # the RSS with the most held.  Not a round's maximum: a later round's 0
        # point is the RSS the round before left, higher than its own peak.
        over = [(r.points[-1][1] - start) / r.held for r in mine if r.held]
        afters = [r.after_kib for r in mine if r.after_kib is not None]
        out.append(
            MemorySummary(
                mode=mode,
                rounds=len(mine),
                held=min(r.held for r in mine),
                kib_per_splice=first.kib_per_splice,
                over_start=(min(over, default=math.nan), max(over, default=math.nan)),
                retained_kib=afters[-1] - afters[0] if len(mine) > 1 and afters else None,
                failed=sum(r.failed for r in mine),
                unsettled=sum(not r.settled for r in mine),
            )
        )
    return out
