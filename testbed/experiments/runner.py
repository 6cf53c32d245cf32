"""Running the experiments on a testbed: the load client in the client namespace.

Every request becomes a `Sample` row, failures included: a request the load
client reports with ok=false keeps its error code, and requests that never
reported (the client crashed or hung) are added as failures with error
``lost``, so nothing is dropped silently.  Within each round every mode runs
once, in an order rotated per round, so drift hits all modes alike.
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from servers.address import format_host_port
from testbed.experiments import memory
from testbed.experiments.connsetup import RateRun, rate_run
from testbed.experiments.cost import Cost, CostMeter
from testbed.experiments.keepalive import (
    KEEPALIVE,
    KeepaliveRun,
    connections_per_worker,
    keepalive_run,
)
from testbed.experiments.memory import MemoryRound
from testbed.experiments.modes import Mode, stop_group
from testbed.experiments.params import Params

MIN_LOAD = "min_load"
HIGH_LOAD = "high_load"
THROUGHPUT = "throughput"
UNSHAPED = "unshaped"
SHAPED = "shaped"
WAN = "wan"
SETUP_RATE = "setup_rate"
DOWNLOAD = "download"
UPLOAD = "upload"
WAN_LINK = "client-proxy"

LINKS = ("client-proxy", "proxy-server")


@dataclass(slots=True)
class Sample:
    """One request of one experiment."""

    experiment: str
    condition: str
    mode: str
    size: int
    concurrency: int
    round: int
    ok: bool
    response_time_s: float | None
    bytes: int
    error: str | None
    detail: str | None
    worker: int
    start: float | None
    setup_s: float | None = None  # connect + SOCKS5 CONNECT, before the response time
    end: float | None = None  # unix time the request was over
    index_on_conn: int | None = None  # keep-alive: 0 opened its connection; None: lost


@dataclass(slots=True)
class Collected:
    samples: list[Sample] = field(default_factory=list)
    costs: list[Cost] = field(default_factory=list)
    rates: list[RateRun] = field(default_factory=list)  # experiment 7
    memory: list[MemoryRound] = field(default_factory=list)  # experiment 8
    keepalive: list[KeepaliveRun] = field(default_factory=list)  # experiment 9
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # modes dropped during the run
    interrupted: bool = False
    error: str | None = None  # what stopped the run early, if something did
    # What the runs depend on beyond the parameters (e.g. congestion control).
    environment: dict[str, Any] = field(default_factory=dict)


def rotated(items: Sequence[Mode], k: int) -> list[Mode]:
    """`items` starting at position k (mod len): each round begins with another mode."""
    if not items:
        return []
    k %= len(items)
    return [*items[k:], *items[:k]]


def parse_loadgen(
    stdout: str, *, sizes: Sequence[int], repeat: int, concurrency: int, why_lost: str
) -> list[dict[str, Any]]:
    """The load client's JSON lines, plus a failure for each request it never reported."""
    results: list[dict[str, Any]] = []
    for line in stdout.splitlines():
        if not line.startswith("{"):
            continue
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict) and "size" in item and "ok" in item:
            results.append(item)
    missing = Counter({size: repeat * concurrency for size in sizes})
    missing.subtract(Counter(int(r["size"]) for r in results))
    for size in sizes:
        for _ in range(max(0, missing[size])):
            results.append(
                {
                    "size": size,
                    "ok": False,
                    "response_time_s": None,
                    "bytes": 0,
                    "error": "lost",
                    "detail": why_lost,
                    "worker": -1,
                    "start": None,
                }
            )
    return results


def loadgen_argv(
    origin: tuple[str, int],
    mode: Mode,
    sizes: Sequence[int],
    repeat: int,
    concurrency: int,
    timeout: float,
    upload: bool = False,
    keepalive: int | None = None,
) -> list[str]:
    argv = [sys.executable, "-m", "clients.loadgen", "--server", format_host_port(*origin)]
    for size in sizes:
        argv += ["--size", str(size)]
    if mode.socks is not None:
        argv += ["--socks5", format_host_port(*mode.socks)]
    if mode.http_proxy is not None:
        argv += ["--http-proxy", format_host_port(*mode.http_proxy)]
    if keepalive is not None:
        argv += ["--keepalive", str(keepalive)]
    argv += ["--repeat", str(repeat), "--concurrency", str(concurrency)]
    # An untimed request per worker first: otherwise every run's first request
    # (the smallest size) also times the process's first getaddrinfo and cold paths.
    argv += ["--timeout", str(timeout), "--warmup"]
    if upload:
        argv.append("--upload")
    return argv


def run_loadgen(
    tb: Any,
    mode: Mode,
    sizes: Sequence[int],
    *,
    repeat: int,
    concurrency: int,
    timeout: float,
    upload: bool = False,
    keepalive: int | None = None,
) -> list[dict[str, Any]]:
    """Run the load client in the client namespace; one dict per request."""
    argv = loadgen_argv(tb.origin, mode, sizes, repeat, concurrency, timeout, upload, keepalive)
    # Each worker's requests run one after another, each bounded by `timeout`.
    per_worker = repeat * (keepalive or 1)
    limit = timeout * per_worker * len(sizes) + 30
    proc = tb.host("client").popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )
    try:
        out, err = proc.communicate(timeout=limit)
        tail = (err.strip().splitlines() or [""])[-1]
        why = f"load client exited {proc.returncode} without reporting: {tail}".strip()
    except subprocess.TimeoutExpired:
        stop_group(proc)
        out, _ = proc.communicate()
        why = f"load client still running after {limit:.0f} s; stopped"
    except BaseException:
        stop_group(proc)
        raise
    return parse_loadgen(out, sizes=sizes, repeat=per_worker, concurrency=concurrency, why_lost=why)


def _samples(
    raw: list[dict[str, Any]], experiment: str, condition: str, mode: str, conc: int, rnd: int
) -> list[Sample]:
    return [
        Sample(
            experiment=experiment,
            condition=condition,
            mode=mode,
            size=int(r["size"]),
            concurrency=conc,
            round=rnd,
            ok=bool(r["ok"]),
            response_time_s=r.get("response_time_s"),
            bytes=int(r.get("bytes") or 0),
            error=r.get("error"),
            detail=r.get("detail"),
            worker=int(r.get("worker", -1)),
            start=r.get("start"),
            setup_s=r.get("setup_s"),
            end=r.get("end"),
            index_on_conn=r.get("index_on_conn"),
        )
        for r in raw
    ]


Step = Callable[[str], None]  # advances the progress bar, naming what runs


def plan_steps(params: Params, n_modes: int, n_daemons: int = 0, n_http: int = 0) -> int:
    """How many runs the suite makes (the progress bar's total).

    `n_modes`: every mode; `n_http` of them are HTTP proxies, which run the
    warm-up and experiment 9 only.  `n_daemons`: the modes on a splice
    daemon, whose memory experiment 8 measures.
    """
    socks = n_modes - n_http
    steps = n_modes * int(params.warmup)
    steps += socks * (
        params.repeat * int(params.min_load)
        + params.load_repeat * len(params.concurrency) * int(params.high_load)
        + params.throughput_repeat * int(params.throughput)
        + int(params.cost)
        + params.setup_rate_repeat * int(params.setup_rate)
    )
    steps += n_daemons * params.memory_repeat * int(params.memory)
    if params.shaped:
        steps += socks * min(params.repeat, 3)
    if params.wan:
        steps += 2 * socks * min(params.repeat, 3)
    if params.keepalive:
        steps += n_modes * params.keepalive_repeat * len(params.keepalive_sizes)
    return steps


def http_modes(modes: Sequence[Mode]) -> list[Mode]:
    """The HTTP forward proxies among `modes` (they run experiment 9 only)."""
    return [m for m in modes if m.http_proxy is not None]


def run_all(tb: Any, params: Params, modes: list[Mode], step: Step, into: Collected) -> None:
    """Experiments 8, 1-6, 9, then 7; results accumulate in `into` (kept if interrupted).

    A mode whose every warm-up request fails is removed from `modes` and
    recorded in `into.skipped`.  HTTP proxy modes run the warm-up and
    experiment 9 only: 1-8 are the thesis's SOCKS comparisons (and the
    memory holder speaks SOCKS5).
    """

    def load(mode: Mode, sizes: Sequence[int], conc: int = 1) -> list[dict[str, Any]]:
        return run_loadgen(tb, mode, sizes, repeat=1, concurrency=conc, timeout=params.timeout)

    if params.warmup:
        for mode in list(modes):
            step(f"warm-up {mode.name}")
            raw = load(mode, params.sizes[:2])
            errors = sorted({str(r.get("error")) for r in raw if not r["ok"]})
            if len(errors) and all(not r["ok"] for r in raw):
                # A path that fails every request would only time out, round after round.
                modes.remove(mode)
                into.skipped[mode.name] = f"every warm-up request failed ({', '.join(errors)})"
            elif errors:
                bad = sum(1 for r in raw if not r["ok"])
                into.notes.append(f"warm-up: {bad} request(s) failed for mode {mode.name}")

    # Experiments 1-8 run the router and the SOCKS paths: the thesis's modes.
    socks = [m for m in modes if m.http_proxy is None]

    # (8) memory per idle splice, first: the daemons have seen only the
    # warm-up.  The later experiments leave thousands of splices in TIME-WAIT
    # (2 MSL, a minute) whose memory, freed meanwhile, the idle splices would
    # reuse, and the slope would read low.
    if params.memory:
        daemons = [m for m in socks if m.splice_daemon is not None]
        if not daemons:
            into.notes.append("memory per idle splice: no mode on a splice daemon ran")
        for mode in daemons:
            for rnd in range(params.memory_repeat):
                step(f"memory {mode.name} round {rnd + 1}")
                try:
                    into.memory.append(memory.run_round(tb, mode, params.memory_splices, rnd))
                except (OSError, RuntimeError) as err:  # the daemon or its API is gone
                    into.notes.append(f"memory {mode.name} round {rnd + 1}: {err}")

    # (1) Fig. 6.1: one connection at a time.
    for rnd in range(params.repeat if params.min_load else 0):
        for mode in rotated(socks, rnd):
            step(f"min load {mode.name} round {rnd + 1}")
            raw = load(mode, params.sizes)
            into.samples += _samples(raw, MIN_LOAD, UNSHAPED, mode.name, 1, rnd)

    # (2) Fig. 6.2: C client processes at once.
    for rnd in range(params.load_repeat if params.high_load else 0):
        for conc in params.concurrency:
            for mode in rotated(socks, rnd):
                step(f"high load {mode.name} x{conc} round {rnd + 1}")
                raw = load(mode, params.load_sizes, conc)
                into.samples += _samples(raw, HIGH_LOAD, UNSHAPED, mode.name, conc, rnd)

    # (3) one long transfer.
    for rnd in range(params.throughput_repeat if params.throughput else 0):
        for mode in rotated(socks, rnd):
            step(f"throughput {mode.name} round {rnd + 1}")
            raw = load(mode, [params.throughput_size])
            into.samples += _samples(raw, THROUGHPUT, UNSHAPED, mode.name, 1, rnd)

    # (4) CPU and context switches over a sustained run.
    if params.cost:
        for mode in socks:
            step(f"cost {mode.name}")
            into.costs.append(_cost_run(tb, params, mode, into.samples))

    # (5) Fig. 6.1 again with impaired links (mid-path, both links).
    if params.shaped:
        with shaped_links(tb, params.shape, into.notes):
            for rnd in range(min(params.repeat, 3)):
                for mode in rotated(socks, rnd):
                    step(f"shaped {mode.name} round {rnd + 1}")
                    raw = load(mode, params.shaped_sizes)
                    into.samples += _samples(raw, MIN_LOAD, SHAPED, mode.name, 1, rnd)

    # (6) over real latency: one long transfer each way with the client link
    # delayed, so the window and congestion-control traps of splicing show.
    if params.wan:
        into.environment["congestion_control"] = {
            role: tb.host(role).sysctl("net.ipv4.tcp_congestion_control").strip()
            for role in ("client", "server")
        }
        into.environment["wan_link"] = WAN_LINK
        with shaped_links(tb, params.wan_shape, into.notes, (WAN_LINK,)):
            for rnd in range(min(params.repeat, 3)):
                for mode in rotated(socks, rnd):
                    for direction in (DOWNLOAD, UPLOAD):
                        step(f"wan {mode.name} {direction} round {rnd + 1}")
                        raw = run_loadgen(
                            tb,
                            mode,
                            [params.wan_size],
                            repeat=1,
                            concurrency=1,
                            timeout=params.timeout,
                            upload=direction == UPLOAD,
                        )
                        into.samples += _samples(raw, WAN, direction, mode.name, 1, rnd)

    # (9) the keep-alive HTTP workload, every mode (HTTP proxies included).
    # Before 7: its tinyproxy runs open a few thousand connections, but in
    # the kernel, not in a splice daemon.
    if params.keepalive:
        for rnd in range(params.keepalive_repeat):
            for mode in rotated(modes, rnd):
                for size in params.keepalive_sizes:
                    step(f"keep-alive {mode.name} {size} B round {rnd + 1}")
                    into.keepalive.append(_keepalive_run(tb, params, mode, size, rnd, into))

    # (7) connections per second: C workers, each request a 1-byte body, back
    # to back.  Last, so the TIME-WAITs it leaves in the daemons (thousands,
    # for 2 MSL) weigh on no other experiment.
    if params.setup_rate:
        conc = params.setup_rate_concurrency
        for rnd in range(params.setup_rate_repeat):
            for mode in rotated(socks, rnd):
                step(f"setup rate {mode.name} round {rnd + 1}")
                raw = run_loadgen(
                    tb,
                    mode,
                    [params.setup_rate_size],
                    repeat=params.setup_rate_connections,
                    concurrency=conc,
                    # A tiny request needs no long timeout, and the run's limit
                    # grows with the timeout times the requests per worker.
                    timeout=min(params.timeout, 10.0),
                )
                into.samples += _samples(raw, SETUP_RATE, UNSHAPED, mode.name, conc, rnd)
                into.rates.append(rate_run(raw, mode.name, rnd, conc))


def _keepalive_run(
    tb: Any, params: Params, mode: Mode, size: int, rnd: int, into: Collected
) -> KeepaliveRun:
    """One run of experiment 9: W workers, C connections each, K GETs of `size` on each."""
    workers, per_conn = params.keepalive_workers, params.keepalive_requests
    conns = connections_per_worker(
        size, workers, per_conn, params.keepalive_run_bytes, params.keepalive_max_connections
    )
    with CostMeter(mode.cost_pids) as meter:
        raw = run_loadgen(
            tb,
            mode,
            [size],
            repeat=conns,
            concurrency=workers,
            timeout=params.timeout,
            keepalive=per_conn,
        )
    user, system, _, machine_cpu, _ = meter.deltas()
    into.samples += _samples(raw, KEEPALIVE, UNSHAPED, mode.name, workers, rnd)
    return keepalive_run(
        raw,
        mode=mode.name,
        size=size,
        rnd=rnd,
        workers=workers,
        per_conn=per_conn,
        # The router has no process of its own: its forwarding is softirq work.
        proc_cpu_s=user + system if mode.cost_pids else None,
        machine_cpu_s=machine_cpu,
    )


def cost_plan(rate_bps: float, seconds: float, size: int) -> int:
    """Requests of `size` bytes to keep a path at `rate_bps` busy for `seconds` (>= 1)."""
    if not rate_bps > 0 or not math.isfinite(rate_bps):
        rate_bps = 50e6
    return max(1, math.ceil(rate_bps * seconds / size))


def _cost_run(tb: Any, params: Params, mode: Mode, samples: list[Sample]) -> Cost:
    size = params.throughput_size if params.quick else (16 << 20)
    times = sorted(
        s.response_time_s
        for s in samples
        if s.mode == mode.name
        and s.experiment == THROUGHPUT
        and s.ok
        and s.response_time_s is not None
    )
    rate = params.throughput_size / times[len(times) // 2] if times else 0.0
    count = cost_plan(rate, params.cost_seconds, size)
    with CostMeter(mode.cost_pids) as meter:
        raw = run_loadgen(tb, mode, [size], repeat=count, concurrency=1, timeout=params.timeout)
    user, system, ctx, machine_cpu, machine_ctx = meter.deltas()
    ok = [r for r in raw if r["ok"]]
    seconds = sum(float(r["response_time_s"]) for r in ok)
    return Cost(
        mode=mode.name,
        condition=UNSHAPED,
        bytes=sum(int(r["bytes"]) for r in ok),
        seconds=seconds,
        proc_user_s=user,
        proc_system_s=system,
        proc_ctx=ctx,
        machine_cpu_s=machine_cpu,
        machine_ctx=machine_ctx,
        failed=len(raw) - len(ok),
        note=mode.cost_note,
    )


@contextlib.contextmanager
def shaped_links(
    tb: Any, shape: str, notes: list[str], links: Sequence[str] = LINKS
) -> Iterator[None]:
    """Shape `links` (both by default) for the block; restore each link's previous shape after."""
    before: dict[str, Any] = {}
    try:
        for name in links:
            link = tb.link(name)
            before[name], _ = link.shape_status()
            link.shape(shape)
        yield
    finally:
        for name in links:
            link = tb.link(name)
            try:
                prev = before.get(name)
                if prev is not None and not prev.is_empty:
                    link.shape(prev)
                else:
                    link.clear()
            except Exception as err:  # report, and restore the other link anyway
                notes.append(f"could not restore link {name}: {err}")
