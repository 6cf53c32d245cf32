"""Processes the testbed starts: pidfiles that survive a crash, exact stops.

A record holds the PID *and* the process's start time, so a later `down`
never signals a recycled PID that now belongs to someone else.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from testbed import netns


class ServiceError(RuntimeError):
    """A service did not start; the message quotes its log."""


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    name: str
    pid: int
    create_time: float
    namespace: str
    argv: tuple[str, ...]
    log: str

    def alive(self) -> bool:
        try:
            proc = psutil.Process(self.pid)
            # Same PID and same start time: still the process we started.
            return bool(
                abs(proc.create_time() - self.create_time) < 0.05
                and proc.status() != psutil.STATUS_ZOMBIE
            )
        except psutil.Error:
            return False


def _pidfile(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.pid.json"


def load(run_dir: Path, name: str) -> ProcessRecord | None:
    try:
        data = json.loads(_pidfile(run_dir, name).read_text())
    except (OSError, ValueError):
        return None
    data["argv"] = tuple(data["argv"])
    return ProcessRecord(**data)


def records(run_dir: Path) -> list[ProcessRecord]:
    if not run_dir.is_dir():
        return []
    found = []
    for path in sorted(run_dir.glob("*.pid.json")):
        rec = load(run_dir, path.name.removesuffix(".pid.json"))
        if rec is not None:
            found.append(rec)
    return found


def start(
    run_dir: Path,
    name: str,
    namespace: str,
    argv: Sequence[str],
    *,
    ready: str | None = "ready",
    timeout: float = 15.0,
    env: dict[str, str] | None = None,
) -> ProcessRecord:
    """Start `argv` in `namespace`, log to run_dir/<name>.log, wait for `ready`.

    `ready` is a line the program prints on stdout once it serves; None means
    "started is enough".  On failure the process is stopped and the error
    quotes the end of its log.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / f"{name}.log"
    with open(log, "wb") as out:
        proc = netns.popen(
            namespace, argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL, env=env
        )
    rec = ProcessRecord(
        name=name,
        pid=proc.pid,
        create_time=psutil.Process(proc.pid).create_time(),
        namespace=namespace,
        argv=tuple(argv),
        log=str(log),
    )
    _pidfile(run_dir, name).write_text(json.dumps(asdict(rec)))
    deadline = time.monotonic() + timeout
    while ready is not None:
        code = proc.poll()
        text = log.read_text(errors="replace")
        if any(line.strip() == ready for line in text.splitlines()):
            break
        if code is not None or time.monotonic() > deadline:
            stop(run_dir, name)
            why = f"exited with status {code}" if code is not None else f"not ready in {timeout}s"
            tail = "\n".join(text.strip().splitlines()[-5:])
            raise ServiceError(f"{name} {why}:\n{tail}")
        time.sleep(0.02)
    return rec


def stop_record(rec: ProcessRecord, timeout: float = 5.0) -> None:
    """SIGTERM the recorded process (and its process group), SIGKILL if it lingers."""
    if not rec.alive():
        return
    try:
        pgid = os.getpgid(rec.pid)
    except ProcessLookupError:
        return
    # Services are started in their own session (netns.popen), so the group
    # is theirs alone: children such as a loadgen's workers go with them.
    group = pgid == rec.pid
    try:
        os.killpg(pgid, signal.SIGTERM) if group else os.kill(rec.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        psutil.Process(rec.pid).wait(timeout)
    except psutil.TimeoutExpired:
        with_kill = os.killpg if group else os.kill
        with contextlib.suppress(ProcessLookupError):
            with_kill(pgid if group else rec.pid, signal.SIGKILL)
    except psutil.Error:
        pass


def stop(run_dir: Path, name: str) -> None:
    rec = load(run_dir, name)
    if rec is not None:
        stop_record(rec)
    _pidfile(run_dir, name).unlink(missing_ok=True)


def kill_namespace_members(namespace: str) -> list[int]:
    """SIGKILL every process still inside `namespace` (the crash safety net).

    Only processes whose network namespace *is* ours are touched: they were
    started in the testbed (by us or by `testbed exec`).
    """
    pids = netns.pids_in(namespace)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).wait(3)
    return pids


def sigterm_as_ctrl_c() -> None:
    """From now on SIGTERM stops this process as Ctrl-C does (KeyboardInterrupt).

    So a run stopped by ``kill``, ``timeout`` or a CI limit still runs its
    cleanup (``finally`` blocks, testbed teardown).  Only in this process:
    pyroute2 forks helper processes (NetNS) that inherit the handler and
    are stopped with SIGTERM, which must end them as it always did.
    """
    owner = os.getpid()

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != owner:  # a forked child: the default action, at once
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
