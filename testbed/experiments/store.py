"""A run's directory: raw data (CSV, JSON), the machine it ran on, package versions."""

from __future__ import annotations

import csv
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from testbed.experiments.claims import ClaimResult
from testbed.experiments.connsetup import RateRun, Split
from testbed.experiments.cost import Cost
from testbed.experiments.keepalive import KeepaliveRun
from testbed.experiments.memory import MemoryRound
from testbed.experiments.runner import Sample
from testbed.experiments.stats import CellStats

CellKey = tuple[str, str, str, int, int]
PACKAGES = ("tcp-splice", "psutil", "pyroute2", "python-pytun", "matplotlib", "tqdm")
DEBIAN = ("dante-server", "microsocks", "tinyproxy-bin", "curl")


def new_run_dir(root: Path, now: float) -> Path:
    """root/<YYYY-mm-ddTHH-MM-SS>, with a suffix if that exists already."""
    stamp = time.strftime("%Y-%m-%dT%H-%M-%S", time.localtime(now))
    path = root / stamp
    n = 1
    while path.exists():
        n += 1
        path = root / f"{stamp}-{n}"
    path.mkdir(parents=True)
    return path


def machine() -> dict[str, Any]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    for name in DEBIAN:
        res = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", name],
            capture_output=True,
            text=True,
            check=False,
        )
        versions[f"deb:{name}"] = res.stdout.strip() if res.returncode == 0 else "not installed"
    root = Path(__file__).resolve().parents[2]
    rev = subprocess.run(
        ["git", "-C", str(root), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "hostname": platform.node(),
        "commit": rev.stdout.strip() or "?",
        "versions": versions,
    }


def _clean(value: Any) -> Any:
    """NaN is not JSON: write null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def cell_rows(cells: Mapping[CellKey, CellStats]) -> list[dict[str, Any]]:
    rows = []
    for (exp, cond, mode, conc, size), c in cells.items():
        row: dict[str, Any] = {
            "experiment": exp,
            "condition": cond,
            "mode": mode,
            "concurrency": conc,
            "size": size,
        }
        row.update(dataclasses.asdict(c))
        row["errors"] = ";".join(f"{k}={v}" for k, v in c.errors.items())
        rows.append(row)
    return rows


def cost_rows(costs: Sequence[Cost]) -> list[dict[str, Any]]:
    rows = []
    for c in costs:
        row = dataclasses.asdict(c)
        row["proc_cpu_ms_per_mb"] = 1000 * c.per_mb(c.proc_user_s + c.proc_system_s)
        row["proc_ctx_per_mb"] = c.per_mb(c.proc_ctx)
        row["machine_cpu_ms_per_mb"] = 1000 * c.per_mb(c.machine_cpu_s)
        row["machine_ctx_per_mb"] = c.per_mb(c.machine_ctx)
        rows.append(row)
    return rows


def rate_rows(runs: Sequence[RateRun]) -> list[dict[str, Any]]:
    rows = []
    for r in runs:
        row = dataclasses.asdict(r)
        row["errors"] = ";".join(f"{k}={v}" for k, v in r.errors.items())
        rows.append(row)
    return rows


def split_rows(splits: Sequence[Split]) -> list[dict[str, Any]]:
    return [dataclasses.asdict(s) | {"setup_share": s.setup_share} for s in splits]


def memory_rows(rounds: Sequence[MemoryRound]) -> list[dict[str, Any]]:
    """One row per point (idle splices held, VmRSS), with its round's results beside it."""
    rows = []
    for r in rounds:
        for splices, rss in r.points:
            rows.append(
                {
                    "mode": r.mode,
                    "round": r.round,
                    "splices": splices,
                    "rss_kib": rss,
                    "after_kib": r.after_kib,
                    "kib_per_splice": r.kib_per_splice,
                    "daemon_idle": r.daemon_idle,
                    "failed": r.failed,
                    "errors": ";".join(f"{k}={v}" for k, v in r.errors.items()),
                    "settled": r.settled,
                    "note": r.note,
                }
            )
    return rows


def keepalive_rows(runs: Sequence[KeepaliveRun]) -> list[dict[str, Any]]:
    """One row per load-client run of experiment 9, its throughput beside it."""
    rows = []
    for r in runs:
        row = dataclasses.asdict(r)
        row["errors"] = ";".join(f"{k}={v}" for k, v in r.errors.items())
        row["throughput_mb_s"] = r.throughput
        rows.append(row)
    return rows


def claim_json(results: Sequence[ClaimResult]) -> list[dict[str, Any]]:
    return [
        {
            "claim": r.key,
            "thesis": r.thesis,
            "reference": r.reference,
            "verdict": r.verdict.value,
            "reason": r.reason,
            "checks": [
                {
                    "size": c.size,
                    "concurrency": c.concurrency,
                    "spliced_s": c.spliced,
                    "reference_s": c.reference,
                    "ratio": c.ratio,
                    "outcome": c.outcome.value,
                }
                for c in r.checks
            ],
        }
        for r in results
    ]


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in fields})


def write_raw(
    out: Path,
    samples: Sequence[Sample],
    cells: Mapping[CellKey, CellStats],
    costs: Sequence[Cost],
    run: Mapping[str, Any],
    *,
    rates: Sequence[RateRun] = (),
    splits: Sequence[Split] = (),
    memory: Sequence[MemoryRound] = (),
    keepalive: Sequence[KeepaliveRun] = (),
) -> None:
    sample_fields = [f.name for f in dataclasses.fields(Sample)]
    sample_dicts = [dataclasses.asdict(s) for s in samples]
    write_csv(out / "samples.csv", sample_dicts, sample_fields)
    (out / "samples.json").write_text(json.dumps(_clean(sample_dicts)))
    summary = cell_rows(cells)
    fields = ["experiment", "condition", "mode", "concurrency", "size"]
    fields += [f.name for f in dataclasses.fields(CellStats)]
    write_csv(out / "summary.csv", summary, fields)
    cost = cost_rows(costs)
    cost_fields = [f.name for f in dataclasses.fields(Cost)]
    cost_fields += ["proc_cpu_ms_per_mb", "proc_ctx_per_mb"]
    cost_fields += ["machine_cpu_ms_per_mb", "machine_ctx_per_mb"]
    write_csv(out / "cost.csv", cost, cost_fields)
    rate = rate_rows(rates)
    write_csv(out / "setup_rate.csv", rate, [f.name for f in dataclasses.fields(RateRun)])
    split = split_rows(splits)
    split_fields = [f.name for f in dataclasses.fields(Split)] + ["setup_share"]
    write_csv(out / "setup_split.csv", split, split_fields)
    mem = memory_rows(memory)
    mem_fields = ["mode", "round", "splices", "rss_kib", "after_kib", "kib_per_splice"]
    mem_fields += ["daemon_idle", "failed", "errors", "settled", "note"]
    write_csv(out / "memory.csv", mem, mem_fields)
    alive = keepalive_rows(keepalive)
    alive_fields = [f.name for f in dataclasses.fields(KeepaliveRun)] + ["throughput_mb_s"]
    write_csv(out / "keepalive.csv", alive, alive_fields)
    full = dict(run)
    full["summary"] = summary
    full["cost"] = cost
    full["setup_rate"] = rate
    full["setup_split"] = split
    full["memory"] = mem
    full["keepalive"] = alive
    (out / "run.json").write_text(json.dumps(_clean(full), indent=1))
