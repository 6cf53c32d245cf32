"""Statistics of one cell (mode x size x load): medians with their spread.

Pure functions, no I/O.  Percentiles interpolate linearly between order
statistics (numpy's default, "type 7").  The confidence interval of a
median is distribution-free: the order statistics x_(j) and x_(k) whose
binomial coverage reaches the level (no resampling, so it is exact and
costs nothing).  With too few samples for the level, the widest interval,
(min, max), is returned with the coverage it really has.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} outside 0..100")
    data = sorted(values)
    if not data:
        return math.nan
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def median_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(low, high, coverage) of a distribution-free CI for the median.

    The interval [x_(j), x_(n+1-j)] (1-based order statistics) covers the
    median with probability 1 - 2 P(X < j), X ~ Binomial(n, 1/2).  The
    largest j that keeps that coverage >= level is taken; when even j = 1
    (min, max) falls short, that interval is returned with its real coverage.
    """
    data = sorted(values)
    n = len(data)
    if n == 0:
        return math.nan, math.nan, 0.0
    if n == 1:
        return data[0], data[0], 0.0
    # P(X < j) * 2^n = C(n, 0) + ... + C(n, j - 1), summed as j grows, in
    # integers: 2.0**n overflows a float beyond n = 1023, and a setup-rate
    # cell holds thousands of requests.
    total = 1 << n
    best, best_below = 1, 1
    below, term = 0, 1  # term = C(n, j - 1)
    for j in range(1, n // 2 + 1):
        below += term
        if 1.0 - 2.0 * (below / total) < level:
            break
        best, best_below = j, below
        term = term * (n - j + 1) // j
    coverage = 1.0 - 2.0 * (best_below / total)
    return data[best - 1], data[n - best], coverage


@dataclass(frozen=True, slots=True)
class CellStats:
    """Response times (seconds) of one cell: successes summarized, failures counted."""

    n_ok: int
    n_failed: int
    errors: dict[str, int]
    median: float
    mean: float
    p5: float
    p95: float
    minimum: float
    maximum: float
    ci_low: float
    ci_high: float
    ci_coverage: float

    @property
    def n(self) -> int:
        return self.n_ok + self.n_failed

    def overlaps(self, other: CellStats) -> bool:
        """Whether the two medians' confidence intervals overlap (no clear difference)."""
        return not (self.ci_high < other.ci_low or other.ci_high < self.ci_low)


def summarize(times: Iterable[float], errors: Iterable[str]) -> CellStats:
    """Stats of the successful times; `errors` has one code per failed request."""
    ok = sorted(times)
    failed: dict[str, int] = {}
    for code in errors:
        failed[code] = failed.get(code, 0) + 1
    low, high, coverage = median_ci(ok)
    return CellStats(
        n_ok=len(ok),
        n_failed=sum(failed.values()),
        errors=dict(sorted(failed.items())),
        median=percentile(ok, 50),
        mean=sum(ok) / len(ok) if ok else math.nan,
        p5=percentile(ok, 5),
        p95=percentile(ok, 95),
        minimum=ok[0] if ok else math.nan,
        maximum=ok[-1] if ok else math.nan,
        ci_low=low,
        ci_high=high,
        ci_coverage=coverage,
    )


class _Row(Protocol):
    experiment: str
    condition: str
    mode: str
    concurrency: int
    size: int
    ok: bool
    response_time_s: float | None
    error: str | None


def cells(rows: Iterable[_Row]) -> dict[tuple[str, str, str, int, int], CellStats]:
    """Group request rows by (experiment, condition, mode, concurrency, size) and summarize."""
    times: dict[tuple[str, str, str, int, int], list[float]] = {}
    errors: dict[tuple[str, str, str, int, int], list[str]] = {}
    for r in rows:
        key = (r.experiment, r.condition, r.mode, r.concurrency, r.size)
        times.setdefault(key, [])
        errors.setdefault(key, [])
        if r.ok and r.response_time_s is not None:
            times[key].append(r.response_time_s)
        else:
            errors[key].append(r.error or "unknown")
    return {key: summarize(times[key], errors[key]) for key in sorted(times)}
