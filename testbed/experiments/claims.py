"""The thesis's claims (section 6.2) held against our numbers.  Pure.

(a) spliced is worse than a normal SOCKS server for small transfers at
    minimum load;
(b) spliced is about as fast as the router above 1 MB;
(c) spliced is more than 25% better than a normal SOCKS server above 1 MB
    (the thesis saw 27%);
(d) at high load spliced is better than a normal SOCKS server at every size.

Each claim is checked per size (and per concurrency for (d)); one size
gives an `Outcome`: it supports the claim, contradicts it, or is a tie
(the difference is inside the noise: the medians' confidence intervals
overlap, the means differ by less than TIE, or a cell has fewer than
MIN_SAMPLES successful requests, as after one --quick round).  The verdict combines them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from testbed.experiments.stats import CellStats

SMALL_MAX = 64 << 10  # "small transfers": up to 64 KB
LARGE_MIN = 1 << 20  # "above 1 MB": strictly larger than 1 MiB
ROUTER_TOLERANCE = 0.15  # "about as fast": at most 15% slower than the router
IMPROVEMENT = 0.25  # claim (c)
TIE = 0.05  # differences of means below 5% count as ties
MIN_SAMPLES = 3  # fewer successful requests in a cell: no difference can be told

# (experiment, condition, mode, concurrency, size) -> stats
CellKey = tuple[str, str, str, int, int]
Cells = Mapping[CellKey, CellStats]


class Outcome(Enum):
    SUPPORTS = "supports"
    CONTRADICTS = "contradicts"
    TIE = "tie"


class Verdict(Enum):
    HOLDS = "holds"
    PARTLY = "holds in part"
    FAILS = "does not hold"
    UNCLEAR = "unclear (within noise)"
    CANNOT_JUDGE = "cannot be judged yet"


@dataclass(frozen=True, slots=True)
class Check:
    """One size (and load) of a claim: the two numbers compared and the outcome."""

    size: int
    concurrency: int
    spliced: float  # seconds: median, or mean for (d)
    reference: float
    outcome: Outcome

    @property
    def ratio(self) -> float:
        return self.spliced / self.reference if self.reference > 0 else math.nan


@dataclass(frozen=True, slots=True)
class ClaimResult:
    key: str
    thesis: str
    reference: str  # the mode compared with
    verdict: Verdict
    checks: tuple[Check, ...] = ()
    reason: str = ""  # why it can't be judged, if so
    extra: dict[str, str] = field(default_factory=dict)


CLAIMS = {
    "a": "spliced is worse than normal SOCKS for small transfers at minimum load",
    "b": "spliced is about as fast as the router above 1 MB",
    "c": "spliced is more than 25% better than normal SOCKS above 1 MB",
    "d": "spliced is better than normal SOCKS at high load, at every size",
}


def combine(outcomes: list[Outcome]) -> Verdict:
    """All support: holds; none support but some contradict: fails; all ties: unclear."""
    if not outcomes:
        return Verdict.CANNOT_JUDGE
    if all(o is Outcome.SUPPORTS for o in outcomes):
        return Verdict.HOLDS
    if all(o is Outcome.TIE for o in outcomes):
        return Verdict.UNCLEAR
    if not any(o is Outcome.SUPPORTS for o in outcomes):
        return Verdict.FAILS
    return Verdict.PARTLY


def _usable(cell: CellStats | None) -> bool:
    return cell is not None and cell.n_ok > 0 and not math.isnan(cell.median)


def _min_load_sizes(cells: Cells, condition: str, mode: str) -> list[int]:
    return sorted(
        k[4] for k, c in cells.items() if k[:3] == ("min_load", condition, mode) and _usable(c)
    )


def _worse(spl: CellStats, ref: CellStats) -> Outcome:
    """Spliced slower than the reference: SUPPORTS; faster: CONTRADICTS."""
    if spl.overlaps(ref) or abs(spl.median / ref.median - 1) < TIE:
        return Outcome.TIE
    return Outcome.SUPPORTS if spl.median > ref.median else Outcome.CONTRADICTS


def _missing(key: str, ref: str, why: str) -> ClaimResult:
    return ClaimResult(key, CLAIMS[key], ref, Verdict.CANNOT_JUDGE, reason=why)


def evaluate(
    cells: Cells, reference: str = "plain", condition: str = "unshaped"
) -> list[ClaimResult]:
    """Claims (a)-(d) with `reference` as the thesis's "normal SOCKS server"."""
    have = {k[2] for k, c in cells.items() if _usable(c)}
    results: list[ClaimResult] = []
    if "spliced" not in have:
        why = "the spliced mode has no successful measurement"
        return [_missing(k, "router" if k == "b" else reference, why) for k in CLAIMS]

    def cell(exp: str, mode: str, conc: int, size: int) -> CellStats | None:
        c = cells.get((exp, condition, mode, conc, size))
        return c if _usable(c) else None

    spliced_sizes = _min_load_sizes(cells, condition, "spliced")
    for key, ref in (("a", reference), ("b", "router"), ("c", reference)):
        if ref not in have:
            results.append(_missing(key, ref, f"the {ref} mode has no successful measurement"))
            continue
        if key == "a":
            sizes = [s for s in spliced_sizes if s <= SMALL_MAX]
        else:
            sizes = [s for s in spliced_sizes if s > LARGE_MIN]
        checks = []
        for size in sizes:
            spl, base = cell("min_load", "spliced", 1, size), cell("min_load", ref, 1, size)
            if spl is None or base is None:
                continue
            if min(spl.n_ok, base.n_ok) < MIN_SAMPLES:
                outcome = Outcome.TIE
            elif key == "a":
                outcome = _worse(spl, base)
            elif key == "b":
                if spl.median <= base.median * (1 + ROUTER_TOLERANCE):
                    outcome = Outcome.SUPPORTS
                elif spl.overlaps(base):
                    outcome = Outcome.TIE
                else:
                    outcome = Outcome.CONTRADICTS
            else:
                # Ties: the spliced median's CI reaches the 25%-better threshold.
                threshold = base.median * (1 - IMPROVEMENT)
                if spl.median <= threshold:
                    outcome = Outcome.SUPPORTS
                elif spl.ci_low <= threshold:
                    outcome = Outcome.TIE
                else:
                    outcome = Outcome.CONTRADICTS
            checks.append(Check(size, 1, spl.median, base.median, outcome))
        if not checks:
            limit = "up to 64 KB" if key == "a" else "above 1 MB"
            results.append(_missing(key, ref, f"no size {limit} measured in both modes"))
            continue
        verdict = combine([c.outcome for c in checks])
        results.append(ClaimResult(key, CLAIMS[key], ref, verdict, tuple(checks)))

    # (d): the thesis averaged response times over the connections: compare means.
    load_keys = sorted(
        (k[3], k[4])
        for k, c in cells.items()
        if k[:3] == ("high_load", condition, "spliced") and _usable(c)
    )
    checks = []
    for conc, size in load_keys:
        spl, base = (
            cell("high_load", "spliced", conc, size),
            cell("high_load", reference, conc, size),
        )
        if spl is None or base is None:
            continue
        ratio = spl.mean / base.mean
        if abs(ratio - 1) < TIE or min(spl.n_ok, base.n_ok) < MIN_SAMPLES:
            outcome = Outcome.TIE
        else:
            outcome = Outcome.SUPPORTS if ratio < 1 else Outcome.CONTRADICTS
        checks.append(Check(size, conc, spl.mean, base.mean, outcome))
    if not checks:
        results.append(_missing("d", reference, "no high-load cell measured in both modes"))
    else:
        verdict = combine([c.outcome for c in checks])
        results.append(ClaimResult("d", CLAIMS["d"], reference, verdict, tuple(checks)))
    return results
