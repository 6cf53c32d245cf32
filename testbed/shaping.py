"""Shape a wire namespace: netem-like impairment without sch_netem.

A wire is a namespace with bridge ``br0`` and ports ``wa`` (toward host A)
and ``wb`` (toward host B).  Shaping it touches only that namespace:

* rate: a tbf qdisc at the root of ``wa`` and ``wb`` egress, so each
  direction is limited on its own, mid-path (no sender qdisc, no TSQ);
* everything else: ``net.bridge.bridge-nf-call-ip{,6}tables=1`` so bridged
  packets traverse the FORWARD chain, one NFQUEUE rule there (marked with a
  comment so we delete exactly our rule) with ``--queue-bypass`` so traffic
  flows if the impair process dies, and ``python -m testbed.impair`` bound
  to the queue.  nfnetlink queues are per namespace, so every wire can use
  the same queue number.

What was changed is written to ``run_dir/<netns>.wire.json`` (with the
sysctl values found before) so ``clear_wire`` undoes exactly that.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from pyroute2 import NetlinkError, NetNS

from testbed.impair import LinkShape

QUEUE_NUM = 0
PORTS = ("wa", "wb")
RULE_COMMENT = "tcp-splice-impair"
READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 3.0
TBF_LATENCY_MS = 50
MAX_TBF_MBIT = 32_000  # tbf's 32-bit rate field counts bytes/s
_BRIDGE_SYSCTLS = {
    "iptables": "net.bridge.bridge-nf-call-iptables",
    "ip6tables": "net.bridge.bridge-nf-call-ip6tables",
}
_PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Impair processes this process started, kept so they are reaped, not zombies.
_children: dict[int, subprocess.Popen[bytes]] = {}


class ShapingError(RuntimeError):
    """A wire could not be shaped or cleared; the message says why."""


def _netns_path(netns: str) -> Path:
    path = Path("/run/netns") / netns
    if "/" in netns or not path.exists():
        raise ShapingError(f"network namespace {netns!r} does not exist ({path})")
    return path


def _files(netns: str, run_dir: Path) -> dict[str, Path]:
    return {
        name: run_dir / f"{netns}.{name}"
        for name in ("wire.json", "impair.pid", "impair.json", "impair.log")
    }


def _run_in_netns(netns: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nsenter", f"--net={_netns_path(netns)}", *argv],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )


def _rule(binary: str, action: str) -> list[str]:
    return [
        binary,
        "-w",
        action,
        "FORWARD",
        "-m",
        "comment",
        "--comment",
        RULE_COMMENT,
        "-j",
        "NFQUEUE",
        "--queue-num",
        str(QUEUE_NUM),
        "--queue-bypass",
    ]


def _tbf_params(rate_mbit: float) -> dict[str, Any]:
    rate_bps = rate_mbit * 1e6 / 8
    # Burst: at least a few full frames, and at least one 4 ms timer tick's
    # worth (HZ=250) so the bucket can keep up with the rate.
    burst = max(int(rate_bps / 250), 4 * 1514)
    return {
        "rate": f"{max(round(rate_mbit * 1e6), 8)}bit",
        "burst": burst,
        "latency": f"{TBF_LATENCY_MS}ms",
    }


def _set_tbf(netns: str, rate_mbit: float | None) -> None:
    """Replace the root qdisc of both ports by tbf, or remove our tbf."""
    _netns_path(netns)
    with NetNS(netns, flags=0) as ns:
        for port in PORTS:
            found = ns.link_lookup(ifname=port)
            if not found:
                raise ShapingError(f"wire {netns!r} has no port {port!r}")
            index = found[0]
            if rate_mbit is not None:
                ns.tc("replace", "tbf", index, handle=0x10000, **_tbf_params(rate_mbit))
                continue
            for qdisc in ns.get_qdiscs(index=index):
                if qdisc.get("kind") == "tbf" and qdisc.get("parent") == 0xFFFFFFFF:
                    with contextlib.suppress(NetlinkError):
                        ns.tc("del", index=index, handle=qdisc["handle"], root=True)


def _read_sysctl(netns: str, key: str) -> str | None:
    res = _run_in_netns(netns, ["sysctl", "-n", key])
    return res.stdout.strip() if res.returncode == 0 else None


def _write_sysctl(netns: str, key: str, value: str) -> None:
    res = _run_in_netns(netns, ["sysctl", "-q", "-w", f"{key}={value}"])
    if res.returncode != 0:
        raise ShapingError(f"{netns}: sysctl {key}={value} failed: {res.stderr.strip()}")


def _stop_process(pid_file: Path) -> None:
    try:
        pid = int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return
    try:
        proc = psutil.Process(pid)
        # Never signal a recycled pid: it must still be our impair process.
        if "testbed.impair" not in " ".join(proc.cmdline()):
            return
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except psutil.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)
    except psutil.NoSuchProcess:
        pass
    child = _children.pop(pid, None)
    if child is not None:
        child.poll()  # reap it if it died on its own


def clear_wire(netns: str, run_dir: Path) -> None:
    """Undo ``shape_wire``: rule, process, qdiscs, sysctls, files.

    Harmless when the wire is not shaped.  The rule goes first so no new
    packet is queued, then the process exits and releases what it holds.
    """
    files = _files(netns, run_dir)
    state: dict[str, Any] = {}
    with contextlib.suppress(FileNotFoundError, ValueError):
        state = json.loads(files["wire.json"].read_text())
    _netns_path(netns)
    for binary in state.get("rules", []):
        for _ in range(16):  # delete every copy of our rule, never another
            if _run_in_netns(netns, _rule(binary, "-D")).returncode != 0:
                break
    _stop_process(files["impair.pid"])
    _set_tbf(netns, None)
    for key, value in state.get("sysctl", {}).items():
        _write_sysctl(netns, key, value)
    for path in files.values():
        path.unlink(missing_ok=True)


def shape_wire(netns: str, shape: LinkShape, run_dir: Path) -> None:
    """Give wire ``netns`` this shape, replacing any shape it had.

    An empty shape (``shape.is_empty``) just clears the wire.
    """
    _netns_path(netns)
    if shape.rate_mbit is not None and shape.rate_mbit > MAX_TBF_MBIT:
        raise ShapingError(f"rate={shape.rate_mbit}mbit is above tbf's {MAX_TBF_MBIT}mbit")
    run_dir.mkdir(parents=True, exist_ok=True)
    clear_wire(netns, run_dir)
    if shape.is_empty:
        return
    files = _files(netns, run_dir)
    state: dict[str, Any] = {"shape": shape.words(), "rules": [], "sysctl": {}}

    def save() -> None:
        files["wire.json"].write_text(json.dumps(state) + "\n")

    save()
    try:
        _set_tbf(netns, shape.rate_mbit)
        if shape.needs_queue:
            binaries = [b for b in _BRIDGE_SYSCTLS if shutil.which(b)]
            if "iptables" not in binaries:
                raise ShapingError("iptables binary not found: needed for the NFQUEUE rule")
            for binary in binaries:
                key = _BRIDGE_SYSCTLS[binary]
                before = _read_sysctl(netns, key)
                if before is None:
                    raise ShapingError(f"{netns}: no {key}: is br_netfilter available?")
                if before != "1":
                    state["sysctl"][key] = before
                    save()
                    _write_sysctl(netns, key, "1")
            _start_impair(netns, shape, files)
            for binary in binaries:
                res = _run_in_netns(netns, _rule(binary, "-A"))
                if res.returncode != 0:
                    raise ShapingError(f"{netns}: {binary} NFQUEUE rule: {res.stderr.strip()}")
                state["rules"].append(binary)
                save()
    except BaseException:
        clear_wire(netns, run_dir)
        raise


def _start_impair(netns: str, shape: LinkShape, files: dict[str, Path]) -> None:
    stats = files["impair.json"]
    stats.unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
    )
    with files["impair.log"].open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "testbed.impair",
                "--netns",
                netns,
                "--queue",
                str(QUEUE_NUM),
                "--stats",
                str(stats),
                *shape.words(),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # a Ctrl-C at the terminal is the testbed's to handle
        )
    _children[proc.pid] = proc
    files["impair.pid"].write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not stats.exists():  # the process writes it once the queue is bound
        if proc.poll() is not None:
            log_text = files["impair.log"].read_text(errors="replace").strip()
            raise ShapingError(f"impair process for {netns} exited: {log_text[-2000:]}")
        if time.monotonic() > deadline:
            raise ShapingError(f"impair process for {netns} not ready after {READY_TIMEOUT_S}s")
        time.sleep(0.01)  # polling a condition, not a guess at how long it takes


def wire_status(netns: str, run_dir: Path) -> tuple[LinkShape | None, dict[str, Any]]:
    """The wire's active shape (None if unshaped) and its latest counters."""
    files = _files(netns, run_dir)
    try:
        state = json.loads(files["wire.json"].read_text())
    except FileNotFoundError:
        return None, {}
    shape = LinkShape.parse(list(state.get("shape", [])))
    counters: dict[str, Any] = {}
    with contextlib.suppress(FileNotFoundError, ValueError):
        counters = json.loads(files["impair.json"].read_text())
    return shape, counters
