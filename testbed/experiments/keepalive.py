"""Experiment 9: the keep-alive HTTP workload, what users run through HTTP proxies.  Pure.

Per mode, size and round, one load-client run: W workers, each opening C
HTTP/1.1 connections one after another and making K GETs of the size on
each (``clients.loadgen --keepalive K``), every response checked.  Through
an HTTP proxy (tinyproxy, the spliced HTTP/1.1 proxy) the requests name the
origin in absolute-form; through a SOCKS mode the K requests ride one
tunnel; the router mode goes straight to the origin.  A proxy that ends the
client's connection after a response (tinyproxy does, after every one)
makes the next request open a new connection: the run counts the
connections it took, so requests per connection says how much keep-alive
the path really gave.

C is chosen per size (`connections_per_worker`): enough connections that a
run moves about `run_bytes`, at most `max_connections` per worker, at least
one.  Small sizes would otherwise be over in a few milliseconds, shorter
than the 10 ms ticks the CPU is counted in.

What a run yields (`KeepaliveRun`): its requests, failures by error code,
connections opened, bytes, wall-clock span (first connection attempt to
the end of the last request), the set-up time summed over its requests,
and the CPU the mode's processes and the whole machine spent meanwhile.
Per mode and size over the rounds (`summarize`): throughput (bytes of
successful requests over the span, median and range over rounds), requests
per connection, mean set-up per request, and CPU per request (summed over
rounds, divided by the successful requests).  Response times per request
are ordinary cells (experiment `KEEPALIVE`) of `stats.cells`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from testbed.experiments.stats import percentile

KEEPALIVE = "keepalive"  # the experiment's name in samples and cells


def connections_per_worker(
    size: int, workers: int, per_conn: int, run_bytes: int, max_connections: int
) -> int:
    """Connections each worker opens in a run of `size`: about `run_bytes` in all."""
    want = math.ceil(run_bytes / max(size * workers * per_conn, 1))
    return max(1, min(max_connections, want))


@dataclass(frozen=True, slots=True)
class KeepaliveRun:
    """One load-client run of experiment 9: one mode, one size, W workers."""

    mode: str
    size: int
    round: int
    workers: int
    per_conn: int  # K: requests each connection was to carry
    attempted: int
    ok: int
    failed: int
    errors: dict[str, int]
    connections: int  # opened: requests that set one up (index_on_conn 0, set-up timed)
    bytes: int  # body bytes of the successful requests
    span_s: float  # first connection attempt to the end of the last request
    setup_s: float  # set-up summed over the requests (0 for those reusing a connection)
    proc_cpu_s: float | None  # the mode's processes, user + system; None: it has none
    machine_cpu_s: float

    @property
    def throughput(self) -> float:
        """MB/s (10^6 bytes) of successful bodies over the run's span; NaN if none."""
        return self.bytes / self.span_s / 1e6 if self.bytes and self.span_s > 0 else math.nan


def keepalive_run(
    raw: Sequence[Mapping[str, Any]],
    *,
    mode: str,
    size: int,
    rnd: int,
    workers: int,
    per_conn: int,
    proc_cpu_s: float | None,
    machine_cpu_s: float,
) -> KeepaliveRun:
    """A run's figures from the load client's result dicts (lost requests included)."""
    errors: dict[str, int] = {}
    for r in raw:
        if not r["ok"]:
            code = str(r.get("error") or "unknown")
            errors[code] = errors.get(code, 0) + 1
    ok = [r for r in raw if r["ok"]]
    # A lost request (never reported) has no times; a failed connect no set-up.
    starts = [float(r["start"]) for r in raw if r.get("start") is not None]
    ends = [float(r["end"]) for r in raw if r.get("end") is not None]
    return KeepaliveRun(
        mode=mode,
        size=size,
        round=rnd,
        workers=workers,
        per_conn=per_conn,
        attempted=len(raw),
        ok=len(ok),
        failed=len(raw) - len(ok),
        errors=dict(sorted(errors.items())),
        connections=sum(
            1 for r in raw if r.get("index_on_conn") == 0 and r.get("setup_s") is not None
        ),
        bytes=sum(int(r.get("bytes") or 0) for r in ok),
        span_s=max(ends) - min(starts) if starts and ends else math.nan,
        setup_s=sum(float(r.get("setup_s") or 0.0) for r in raw),
        proc_cpu_s=proc_cpu_s,
        machine_cpu_s=machine_cpu_s,
    )


@dataclass(frozen=True, slots=True)
class KeepaliveSummary:
    """One mode and size over its rounds."""

    mode: str
    size: int
    rounds: int
    requests: int  # attempted, over all rounds
    failed: int
    errors: dict[str, int]
    per_conn: int  # K asked for
    requests_per_conn: float  # successful requests per connection opened: K at best
    setup_per_request: float  # seconds, mean over the requests (reuses count as 0)
    throughput: float  # MB/s, median over rounds (a round with no success counts as 0)
    throughput_low: float
    throughput_high: float
    proc_cpu_per_request: float | None  # seconds; None: no process (router) or no success
    machine_cpu_per_request: float


def summarize(runs: Sequence[KeepaliveRun], modes: Sequence[str]) -> list[KeepaliveSummary]:
    """Per mode (in `modes` order) and size (ascending)."""
    out = []
    for mode in modes:
        for size in sorted({r.size for r in runs if r.mode == mode}):
            mine = [r for r in runs if r.mode == mode and r.size == size]
            rates = [0.0 if math.isnan(r.throughput) else r.throughput for r in mine]
            ok = sum(r.ok for r in mine)
            errors: dict[str, int] = {}
            for r in mine:
                for code, n in r.errors.items():
                    errors[code] = errors.get(code, 0) + n
            attempted = sum(r.attempted for r in mine)
            connections = sum(r.connections for r in mine)
            cpu = [r.proc_cpu_s for r in mine]
            proc = (
                sum(c for c in cpu if c is not None) / ok
                if ok and all(c is not None for c in cpu)
                else None
            )
            out.append(
                KeepaliveSummary(
                    mode=mode,
                    size=size,
                    rounds=len(mine),
                    requests=attempted,
                    failed=sum(r.failed for r in mine),
                    errors=dict(sorted(errors.items())),
                    per_conn=mine[0].per_conn,
                    requests_per_conn=ok / connections if connections else math.nan,
                    setup_per_request=(
                        sum(r.setup_s for r in mine) / attempted if attempted else math.nan
                    ),
                    throughput=percentile(rates, 50),
                    throughput_low=min(rates),
                    throughput_high=max(rates),
                    proc_cpu_per_request=proc,
                    machine_cpu_per_request=(
                        sum(r.machine_cpu_s for r in mine) / ok if ok else math.nan
                    ),
                )
            )
    return out
