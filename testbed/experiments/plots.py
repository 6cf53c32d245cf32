"""The figures of a run (matplotlib, Agg backend: files only, no display).

* ``fig6_1_min_load.png``: response time vs size, log-log, per mode
  (median; the bars span p5..p95), as the thesis's Fig. 6.1;
* ``fig6_1_shaped.png``: the same on shaped links;
* ``fig6_2_high_load.png``: one panel per concurrency: mean (the thesis's
  figure averages) and p95 (dashed) per mode;
* ``throughput.png``: median MB/s of one long transfer per mode;
* ``cost.png``: CPU milliseconds and context switches per MB relayed;
* ``fig6_1_setup_split.png``: small requests at minimum load, one panel per
  size: the median set-up and transfer stacked, per mode;
* ``setup_rate.png``: connections per second per mode (median over rounds,
  bars min..max);
* ``memory.png``: one panel per splice daemon: VmRSS vs idle splices held,
  one line per round, its slope (KiB per splice) in the legend;
* ``keepalive.png``: the keep-alive workload, one panel per metric against
  the size: response time per request (median, bars its 95% confidence
  interval), throughput of the W workers together (median over rounds,
  bars min..max), CPU per request (the mode's processes solid, the whole
  machine dashed).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from testbed.experiments.connsetup import RateRun, Split, summarize_rates
from testbed.experiments.cost import Cost
from testbed.experiments.keepalive import KEEPALIVE, KeepaliveRun
from testbed.experiments.keepalive import summarize as summarize_keepalive
from testbed.experiments.memory import MemoryRound
from testbed.experiments.stats import CellStats

CellKey = tuple[str, str, str, int, int]

MARKERS = {
    "router": "o",
    "plain": "s",
    "endpoint": "^",
    "spliced": "D",
    "spliced-py": "d",
    "spliced-kernel": "h",
    "spliced-kernel-after": "H",
    "dante": "v",
    "tinyproxy": "P",
    "http11": "*",
    "http11-copy": "X",
}


def _label_size(size: float) -> str:
    for unit, scale in (("M", 1 << 20), ("K", 1 << 10)):
        if size >= scale:
            return f"{size / scale:g}{unit}"
    return f"{size:g}"


def _series(
    cells: Mapping[CellKey, CellStats], exp: str, cond: str, mode: str, conc: int
) -> list[tuple[int, CellStats]]:
    return sorted(
        (k[4], c) for k, c in cells.items() if k[:4] == (exp, cond, mode, conc) and c.n_ok > 0
    )


def response_time_figure(
    cells: Mapping[CellKey, CellStats],
    modes: Sequence[str],
    path: Path,
    *,
    condition: str = "unshaped",
    title: str = "Response time at minimum load (thesis Fig. 6.1)",
) -> bool:
    fig, ax = plt.subplots(figsize=(8, 5.5))
    drawn = False
    for mode in modes:
        series = _series(cells, "min_load", condition, mode, 1)
        if not series:
            continue
        xs = [s for s, _ in series]
        ys = [c.median for _, c in series]
        low = [max(c.median - c.p5, 0.0) for _, c in series]
        high = [max(c.p95 - c.median, 0.0) for _, c in series]
        ax.errorbar(xs, ys, yerr=[low, high], marker=MARKERS.get(mode, "x"), capsize=3, label=mode)
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = sorted({k[4] for k in cells if k[0] == "min_load" and k[1] == condition})
    ax.set_xticks(ticks, [_label_size(t) for t in ticks])
    ax.set_xlabel("transfer size (bytes)")
    ax.set_ylabel("response time (s): median, bars p5..p95")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def high_load_figure(cells: Mapping[CellKey, CellStats], modes: Sequence[str], path: Path) -> bool:
    concs = sorted({k[3] for k in cells if k[0] == "high_load"})
    if not concs:
        return False
    fig, axes = plt.subplots(1, len(concs), figsize=(5 * len(concs), 4.5), squeeze=False)
    for ax, conc in zip(axes[0], concs, strict=True):
        for i, mode in enumerate(modes):
            series = _series(cells, "high_load", "unshaped", mode, conc)
            if not series:
                continue
            xs = [s for s, _ in series]
            color = f"C{i}"
            ax.plot(
                xs,
                [c.mean for _, c in series],
                marker=MARKERS.get(mode, "x"),
                color=color,
                label=f"{mode} mean",
            )
            ax.plot(xs, [c.p95 for _, c in series], linestyle="--", color=color, alpha=0.6)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{conc} concurrent clients")
        ax.set_xlabel("transfer size (bytes)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("response time (s): mean, dashed p95")
    axes[0][0].legend(fontsize="small")
    fig.suptitle("Response time at high load (thesis Fig. 6.2)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def throughput_figure(cells: Mapping[CellKey, CellStats], modes: Sequence[str], path: Path) -> bool:
    rows = []
    for mode in modes:
        for key, c in cells.items():
            if key[:3] == ("throughput", "unshaped", mode) and c.n_ok > 0:
                size = key[4]
                # Rate from the median time; p95 time gives the low end, p5 the high end.
                rows.append((mode, size / c.median / 1e6, size / c.p95 / 1e6, size / c.p5 / 1e6))
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = [r[0] for r in rows]
    mid = [r[1] for r in rows]
    err = [[r[1] - r[2] for r in rows], [r[3] - r[1] for r in rows]]
    ax.bar(names, mid, yerr=err, capsize=4, color=[f"C{i}" for i in range(len(rows))])
    ax.set_ylabel("MB/s (10^6 bytes), median; bars p5..p95")
    ax.set_title("Throughput of one long transfer")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def cost_figure(costs: Sequence[Cost], path: Path) -> bool:
    usable = [c for c in costs if c.bytes > 0]
    if not usable:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    names = [c.mode for c in usable]
    user = [1000 * c.per_mb(c.proc_user_s) for c in usable]
    system = [1000 * c.per_mb(c.proc_system_s) for c in usable]
    machine = [1000 * c.per_mb(c.machine_cpu_s) for c in usable]
    xs = range(len(usable))
    ax1.bar([x - 0.2 for x in xs], user, width=0.4, label="proxy user")
    ax1.bar([x - 0.2 for x in xs], system, width=0.4, bottom=user, label="proxy system")
    ax1.bar([x + 0.2 for x in xs], machine, width=0.4, label="whole machine", color="grey")
    ax1.set_xticks(list(xs), names)
    ax1.set_ylabel("CPU ms per MB relayed")
    ax1.legend(fontsize="small")
    ax1.grid(True, axis="y", alpha=0.3)
    proc_ctx = [c.per_mb(c.proc_ctx) for c in usable]
    machine_ctx = [c.per_mb(c.machine_ctx) for c in usable]
    ax2.bar([x - 0.2 for x in xs], proc_ctx, width=0.4, label="proxy (lower bound)")
    ax2.bar([x + 0.2 for x in xs], machine_ctx, width=0.4, label="whole machine", color="grey")
    ax2.set_xticks(list(xs), names)
    ax2.set_ylabel("context switches per MB")
    ax2.legend(fontsize="small")
    ax2.grid(True, axis="y", alpha=0.3)
    fig.suptitle("Cost of relaying (sustained run)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def setup_split_figure(splits: Sequence[Split], modes: Sequence[str], path: Path) -> bool:
    usable = [s for s in splits if s.n > 0]
    sizes = sorted({s.size for s in usable})
    if not sizes:
        return False
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.5 * len(sizes), 4.5), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        row = [s for m in modes for s in usable if s.mode == m and s.size == size]
        names = [s.mode for s in row]
        setup = [1000 * s.setup for s in row]
        transfer = [1000 * s.transfer for s in row]
        ax.bar(names, setup, label="set-up (connect + SOCKS5 CONNECT)", color="C1")
        ax.bar(names, transfer, bottom=setup, label="transfer (request to last byte)", color="C0")
        ax.set_title(f"{_label_size(size)} at minimum load")
        ax.tick_params(axis="x", labelrotation=30)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].set_ylabel("ms, medians stacked")
    axes[0][0].legend(fontsize="small")
    fig.suptitle("Small requests: connection set-up and transfer (a panel of Fig. 6.1)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def setup_rate_figure(rates: Sequence[RateRun], modes: Sequence[str], path: Path) -> bool:
    summary = summarize_rates(rates, modes)
    if not summary:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = [r.mode for r in summary]
    mid = [r.median for r in summary]
    err = [[r.median - r.low for r in summary], [r.high - r.median for r in summary]]
    ax.bar(names, mid, yerr=err, capsize=4, color=[f"C{i}" for i in range(len(summary))])
    for x, r in enumerate(summary):
        if r.failed:
            ax.annotate(f"{r.failed} failed", (x, r.median), ha="center", va="bottom", color="red")
    ax.set_ylabel("connections/s: median over rounds, bars min..max")
    ax.set_title(
        f"Connection set-up rate ({summary[0].concurrency} workers, tiny requests back to back)"
    )
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def memory_figure(rounds: Sequence[MemoryRound], modes: Sequence[str], path: Path) -> bool:
    daemons = [m for m in modes if any(r.mode == m and len(r.points) > 1 for r in rounds)]
    if not daemons:
        return False
    fig, axes = plt.subplots(
        1, len(daemons), figsize=(6 * len(daemons), 4.5), squeeze=False, sharey=True
    )
    for ax, mode in zip(axes[0], daemons, strict=True):
        for r in sorted((r for r in rounds if r.mode == mode), key=lambda r: r.round):
            xs = [n for n, _ in r.points]
            ys = [rss / 1024 for _, rss in r.points]
            ax.plot(
                xs, ys, marker="o", label=f"round {r.round + 1}: {r.kib_per_splice:.1f} KiB/splice"
            )
        ax.set_title(mode)
        ax.set_xlabel("idle splices held")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    axes[0][0].set_ylabel("daemon VmRSS (MiB)")
    fig.suptitle("The splice daemon's memory with idle splices held")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def keepalive_figure(
    cells: Mapping[CellKey, CellStats],
    runs: Sequence[KeepaliveRun],
    modes: Sequence[str],
    path: Path,
) -> bool:
    summary = summarize_keepalive(runs, modes)
    if not summary:
        return False
    fig, (times, rates, cpu) = plt.subplots(1, 3, figsize=(16, 5))
    for i, mode in enumerate(modes):
        rows = [s for s in summary if s.mode == mode]
        if not rows:
            continue
        style = {"marker": MARKERS.get(mode, "x"), "color": f"C{i}"}
        timed = [
            (s.size, c)
            for s in rows
            if (c := cells.get((KEEPALIVE, "unshaped", mode, runs[0].workers, s.size)))
            and c.n_ok > 0
        ]
        if timed:
            xs = [size for size, _ in timed]
            ys = [c.median for _, c in timed]
            low = [max(c.median - c.ci_low, 0.0) for _, c in timed]
            high = [max(c.ci_high - c.median, 0.0) for _, c in timed]
            times.errorbar(xs, ys, yerr=[low, high], capsize=3, label=mode, **style)
        moved = [s for s in rows if s.throughput > 0]
        if moved:
            rates.errorbar(
                [s.size for s in moved],
                [s.throughput for s in moved],
                yerr=[
                    [s.throughput - s.throughput_low for s in moved],
                    [s.throughput_high - s.throughput for s in moved],
                ],
                capsize=3,
                label=mode,
                **style,
            )
        own = [s for s in rows if s.proc_cpu_per_request is not None]
        if own:
            cpu.plot(
                [s.size for s in own],
                [1000 * (s.proc_cpu_per_request or 0.0) for s in own],
                label=f"{mode}",
                **style,
            )
        machine = [s for s in rows if s.machine_cpu_per_request > 0]
        if machine:
            cpu.plot(
                [s.size for s in machine],
                [1000 * s.machine_cpu_per_request for s in machine],
                linestyle="--",
                color=style["color"],
                alpha=0.6,
            )
    sizes = sorted({s.size for s in summary})
    for ax in (times, rates, cpu):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes, [_label_size(s) for s in sizes])
        ax.set_xlabel("response size (bytes)")
        ax.grid(True, which="both", alpha=0.3)
    times.set_ylabel("response time per request (s): median, bars 95% CI")
    times.set_title("Response time")
    rates.set_ylabel("MB/s (10^6 bytes), all workers: median, bars min..max")
    rates.set_title("Throughput")
    cpu.set_ylabel("CPU ms per request: the mode's processes (dashed: machine)")
    cpu.set_title("CPU per request")
    times.legend(fontsize="small")
    first = runs[0]
    fig.suptitle(f"Keep-alive HTTP: {first.workers} workers, {first.per_conn} GETs per connection")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_all(
    out: Path,
    cells: Mapping[CellKey, CellStats],
    modes: Sequence[str],
    costs: Sequence[Cost],
    *,
    splits: Sequence[Split] = (),
    rates: Sequence[RateRun] = (),
    memory: Sequence[MemoryRound] = (),
    keepalive: Sequence[KeepaliveRun] = (),
) -> list[str]:
    """Draw every figure there is data for; return the file names written."""
    made = []
    jobs: list[tuple[str, Callable[[Path], bool]]] = [
        ("fig6_1_min_load.png", lambda p: response_time_figure(cells, modes, p)),
        (
            "fig6_1_shaped.png",
            lambda p: response_time_figure(
                cells, modes, p, condition="shaped", title="Response time on shaped links"
            ),
        ),
        ("fig6_2_high_load.png", lambda p: high_load_figure(cells, modes, p)),
        ("throughput.png", lambda p: throughput_figure(cells, modes, p)),
        ("cost.png", lambda p: cost_figure(costs, p)),
        ("fig6_1_setup_split.png", lambda p: setup_split_figure(splits, modes, p)),
        ("setup_rate.png", lambda p: setup_rate_figure(rates, modes, p)),
        ("memory.png", lambda p: memory_figure(rounds=memory, modes=modes, path=p)),
        ("keepalive.png", lambda p: keepalive_figure(cells, keepalive, modes, p)),
    ]
    for name, draw in jobs:
        if draw(out / name):
            made.append(name)
    return made
