"""What relaying costs: CPU seconds and context switches, per MB relayed.

Two views, sampled before and after a sustained run (several seconds: CPU
time is accounted in 100 Hz ticks, so short runs read as zero):

* the proxy's own processes (the mode's PIDs and all their children):
  user and system CPU from /proc/PID/stat, which includes threads that
  already exited; context switches summed over the threads alive at each
  sample (Linux keeps no per-process total of exited threads' switches,
  so a proxy with a thread per connection is undercounted: a lower bound).
  Threads are polled during the run to catch short-lived ones.
* the whole machine (/proc/stat): CPU and context switches of everything,
  client, server and softirq forwarding included.  Client and server do the
  same work in every mode, so differences between modes are the proxy's.

Writing to a TUN runs the kernel's forwarding and the receiver's TCP in the
writer's context (DESIGN.md "CPU accounting"): the daemon's system time
therefore includes work a copying proxy leaves to softirq.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from pathlib import Path

import psutil

MB = 1e6


@dataclass(frozen=True, slots=True)
class CostSample:
    """Cumulative counters at one moment."""

    proc_user: float
    proc_system: float
    machine_busy: float  # all CPUs, seconds not idle/iowait
    machine_ctx: int


@dataclass(frozen=True, slots=True)
class Cost:
    """One mode's sustained run, per MB (10^6 bytes) relayed."""

    mode: str
    condition: str
    bytes: int
    seconds: float
    proc_user_s: float
    proc_system_s: float
    proc_ctx: int
    machine_cpu_s: float
    machine_ctx: int
    failed: int
    note: str

    @property
    def mb(self) -> float:
        return self.bytes / MB

    def per_mb(self, value: float) -> float:
        return value / self.mb if self.bytes else float("nan")


def _thread_ctx(tid_path: Path) -> int:
    total = 0
    for line in tid_path.joinpath("status").read_text().splitlines():
        if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
            total += int(line.split()[1])
    return total


def _tree(pids: tuple[int, ...]) -> list[psutil.Process]:
    procs: list[psutil.Process] = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            top = psutil.Process(pid)
            procs.append(top)
            procs.extend(top.children(recursive=True))
    return procs


@dataclass(slots=True)
class ThreadSwitches:
    """Context switches per thread, polled: last seen value minus first seen value."""

    first: dict[tuple[int, int], int] = field(default_factory=dict)
    last: dict[tuple[int, int], int] = field(default_factory=dict)

    def poll(self, pids: tuple[int, ...], baseline: bool = False) -> None:
        for proc in _tree(pids):
            with contextlib.suppress(OSError, psutil.Error):
                for task in Path(f"/proc/{proc.pid}/task").iterdir():
                    with contextlib.suppress(OSError, ValueError):
                        key = (proc.pid, int(task.name))
                        value = _thread_ctx(task)
                        # A thread born during the run started from zero.
                        self.first.setdefault(key, value if baseline else 0)
                        self.last[key] = value

    def total(self) -> int:
        return sum(self.last[k] - self.first.get(k, 0) for k in self.last)


def sample(pids: tuple[int, ...]) -> CostSample:
    user = system = 0.0
    for proc in _tree(pids):
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            # children_*: children this process reaped (exited workers).
            user += t.user + t.children_user
            system += t.system + t.children_system
    cpu = psutil.cpu_times()
    busy = sum(cpu) - cpu.idle - getattr(cpu, "iowait", 0.0)
    return CostSample(user, system, busy, psutil.cpu_stats().ctx_switches)


class CostMeter:
    """Counters of `pids` and the machine around a run: `with CostMeter(...) as m: ...`."""

    def __init__(self, pids: tuple[int, ...], poll_interval: float = 0.05) -> None:
        self.pids = pids
        self.poll_interval = poll_interval
        self.switches = ThreadSwitches()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self.before: CostSample | None = None
        self.after: CostSample | None = None

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_interval):
            self.switches.poll(self.pids)

    def __enter__(self) -> CostMeter:
        self.switches.poll(self.pids, baseline=True)
        self.before = sample(self.pids)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.after = sample(self.pids)
        self.switches.poll(self.pids)

    def deltas(self) -> tuple[float, float, int, float, int]:
        """(proc user s, proc system s, proc ctx, machine CPU s, machine ctx)."""
        assert self.before is not None and self.after is not None
        b, a = self.before, self.after
        return (
            a.proc_user - b.proc_user,
            a.proc_system - b.proc_system,
            self.switches.total(),
            a.machine_busy - b.machine_busy,
            a.machine_ctx - b.machine_ctx,
        )
