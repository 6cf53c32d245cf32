"""Connection set-up: how many per second (experiment 7), and its share of small requests.  Pure.

* Setup rate: C load-client workers each make R requests of a 1-byte body
  back to back (connect, SOCKS5 CONNECT, GET, close); the rate is the
  successful requests over the run's wall-clock span, from the first
  connection attempt to the end of the last request.  Failed requests count
  in the span and are reported, never dropped.
* Setup vs transfer (a panel of Fig. 6.1): the minimum-load requests up to
  64 KB, each split into set-up (connect + SOCKS5 CONNECT reply: the load
  client's ``setup_s``, curl's time_pretransfer) and transfer (request sent
  to last byte: the response time of Fig. 6.1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from testbed.experiments.stats import percentile


@dataclass(frozen=True, slots=True)
class RateRun:
    """One load-client run of the setup-rate experiment."""

    mode: str
    round: int
    concurrency: int
    attempted: int
    ok: int
    failed: int
    errors: dict[str, int]
    span_s: float  # first connection attempt to the end of the last request
    rate: float  # successful requests per second over the span; NaN if none


def rate_run(raw: Sequence[Mapping[str, Any]], mode: str, rnd: int, concurrency: int) -> RateRun:
    """A run's rate from the load client's result dicts (lost requests included)."""
    errors: dict[str, int] = {}
    for r in raw:
        if not r["ok"]:
            code = str(r.get("error") or "unknown")
            errors[code] = errors.get(code, 0) + 1
    ok = len(raw) - sum(errors.values())
    # Lost requests (the client never reported them) have no times: the span
    # is what was reported, and the loss shows as a failure.
    starts = [float(r["start"]) for r in raw if r.get("start") is not None]
    ends = [float(r["end"]) for r in raw if r.get("end") is not None]
    span = max(ends) - min(starts) if starts and ends else math.nan
    rate = ok / span if ok and span > 0 else math.nan
    return RateRun(mode, rnd, concurrency, len(raw), ok, len(raw) - ok, errors, span, rate)


@dataclass(frozen=True, slots=True)
class RateSummary:
    """One mode over its rounds: the median rate and the range."""

    mode: str
    rounds: int
    concurrency: int
    connections: int  # attempted, over all rounds
    median: float  # successful requests per second, median over rounds
    low: float
    high: float
    failed: int
    errors: dict[str, int]


def summarize_rates(runs: Sequence[RateRun], modes: Sequence[str]) -> list[RateSummary]:
    """Per mode, in `modes` order; a run with no success counts as rate 0, not as missing."""
    out = []
    for mode in modes:
        mine = [r for r in runs if r.mode == mode]
        if not mine:
            continue
        rates = [0.0 if math.isnan(r.rate) else r.rate for r in mine]
        errors: dict[str, int] = {}
        for r in mine:
            for code, n in r.errors.items():
                errors[code] = errors.get(code, 0) + n
        out.append(
            RateSummary(
                mode=mode,
                rounds=len(mine),
                concurrency=mine[0].concurrency,
                connections=sum(r.attempted for r in mine),
                median=percentile(rates, 50),
                low=min(rates),
                high=max(rates),
                failed=sum(r.failed for r in mine),
                errors=dict(sorted(errors.items())),
            )
        )
    return out


class _Row(Protocol):
    experiment: str
    condition: str
    mode: str
    size: int
    ok: bool
    response_time_s: float | None
    setup_s: float | None


@dataclass(frozen=True, slots=True)
class Split:
    """Small requests of one mode and size: median set-up, transfer and their sum."""

    mode: str
    size: int
    n: int  # requests with both parts timed
    failed: int
    setup: float  # seconds, median over requests
    transfer: float  # seconds, median (Fig. 6.1's response time)
    total: float  # median of set-up + transfer per request

    @property
    def setup_share(self) -> float:
        """Set-up's part of the two medians stacked (what the figure shows)."""
        both = self.setup + self.transfer
        return self.setup / both if both > 0 else math.nan


def splits(
    rows: Iterable[_Row],
    modes: Sequence[str],
    max_size: int,
    experiment: str = "min_load",
    condition: str = "unshaped",
) -> list[Split]:
    """The set-up/transfer split per mode and size up to `max_size`, modes in order."""
    timed: dict[tuple[str, int], list[tuple[float, float]]] = {}
    failed: dict[tuple[str, int], int] = {}
    for r in rows:
        if (r.experiment, r.condition) != (experiment, condition) or r.size > max_size:
            continue
        key = (r.mode, r.size)
        timed.setdefault(key, [])
        failed.setdefault(key, 0)
        if not r.ok:
            failed[key] += 1
        elif r.response_time_s is not None and r.setup_s is not None:
            timed[key].append((r.setup_s, r.response_time_s))
    out = []
    for mode in modes:
        for key in sorted(k for k in timed if k[0] == mode):
            pairs = timed[key]
            out.append(
                Split(
                    mode=mode,
                    size=key[1],
                    n=len(pairs),
                    failed=failed[key],
                    setup=percentile([s for s, _ in pairs], 50),
                    transfer=percentile([t for _, t in pairs], 50),
                    total=percentile([s + t for s, t in pairs], 50),
                )
            )
    return out
