"""Shaping a real wire: a -- wire(br0: wa, wb) -- b, in namespaces tbi<hex>-a/-w/-b."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from pyroute2 import NetNS, netns

from testbed.impair import LinkShape
from testbed.shaping import ShapingError, clear_wire, shape_wire, wire_status

pytestmark = pytest.mark.root

ADDR_A, ADDR_B = "192.0.2.1", "192.0.2.2"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class Wire:
    a: str
    w: str
    b: str
    run_dir: Path


def _build(names: dict[str, str]) -> None:
    with NetNS(names["w"], flags=0) as w:
        w.link("add", ifname="br0", kind="bridge")
        for port, host in (("wa", "a"), ("wb", "b")):
            w.link(
                "add", ifname=port, kind="veth", peer={"ifname": "eth0", "net_ns_fd": names[host]}
            )
        br = w.link_lookup(ifname="br0")[0]
        for port in ("wa", "wb"):
            w.link("set", index=w.link_lookup(ifname=port)[0], master=br, state="up")
        w.link("set", index=br, state="up")
    for host, addr in (("a", ADDR_A), ("b", ADDR_B)):
        with NetNS(names[host], flags=0) as h:
            eth = h.link_lookup(ifname="eth0")[0]
            h.addr("add", index=eth, address=addr, prefixlen=24)
            h.link("set", index=eth, state="up")
            h.link("set", index=h.link_lookup(ifname="lo")[0], state="up")


@pytest.fixture
def wire(tmp_path: Path) -> Iterator[Wire]:
    prefix = "tbi" + secrets.token_hex(3)
    names = {role: f"{prefix}-{role}" for role in "awb"}
    created: list[str] = []
    try:
        for name in names.values():
            netns.create(name)
            created.append(name)
        _build(names)
        yield Wire(names["a"], names["w"], names["b"], tmp_path / "run")
    finally:
        try:
            if names["w"] in created:
                clear_wire(names["w"], tmp_path / "run")
        finally:
            for name in created:
                netns.remove(name)


def socket_in(ns: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket living in namespace ``ns``: created by a thread that entered it."""
    result: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            result.append(socket.socket(socket.AF_INET, kind))
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=make)
    t.start()
    t.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def pattern(size: int, seed: int = 1) -> bytes:
    block = hashlib.sha256(seed.to_bytes(4, "big")).digest() * 2048
    return (block * (size // len(block) + 1))[:size]


def transfer(w: Wire, data: bytes, timeout: float = 60.0) -> tuple[bytes, float]:
    """Send ``data`` from b to a over TCP; return what arrived and the seconds it took."""
    lsock = socket_in(w.b)
    lsock.bind((ADDR_B, 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            conn, _ = lsock.accept()
            with conn:
                conn.sendall(data)
        except BaseException as exc:
            errors.append(exc)

    server = threading.Thread(target=serve)
    server.start()
    chunks: list[bytes] = []
    try:
        with socket_in(w.a) as cli:
            cli.settimeout(timeout)
            start = time.monotonic()
            cli.connect((ADDR_B, port))
            while chunk := cli.recv(1 << 16):
                chunks.append(chunk)
            elapsed = time.monotonic() - start
    finally:
        server.join(timeout)
        lsock.close()
    assert not errors, errors
    return b"".join(chunks), elapsed


def connect_time(w: Wire, tries: int = 5) -> float:
    """Median TCP handshake time a -> b (one RTT)."""
    lsock = socket_in(w.b)
    lsock.bind((ADDR_B, 0))
    lsock.listen(16)
    port = lsock.getsockname()[1]
    times = []
    try:
        for _ in range(tries):
            with socket_in(w.a) as cli:
                cli.settimeout(5)
                start = time.monotonic()
                cli.connect((ADDR_B, port))
                times.append(time.monotonic() - start)
            lsock.accept()[0].close()
    finally:
        lsock.close()
    return sorted(times)[len(times) // 2]


def tcp_in_csum_errors(ns: str) -> int:
    """TcpInCsumErrors of namespace ``ns`` (RFC 4022 tcpInCsumErrors)."""
    text = subprocess.run(
        ["nsenter", f"--net=/run/netns/{ns}", "cat", "/proc/net/snmp"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names, values = (line.split()[1:] for line in text.splitlines() if line.startswith("Tcp:"))
    return int(dict(zip(names, values, strict=True))["InCsumErrors"])


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_delay_20ms_adds_40ms_to_the_handshake(wire: Wire) -> None:
    base = connect_time(wire)
    shape_wire(wire.w, LinkShape.parse(["delay=20ms"]), wire.run_dir)
    slow = connect_time(wire)
    assert 0.038 <= slow - base <= 0.070, (base, slow)  # 2 x 20 ms, plus scheduling


def test_impaired_transfer_arrives_intact_and_counts_impairments(wire: Wire) -> None:
    shape = LinkShape.parse(
        ["loss=2%", "duplicate=2%", "reorder=25%", "delay=5ms", "corrupt=0.5%", "seed=7"]
    )
    shape_wire(wire.w, shape, wire.run_dir)
    data = pattern(4 << 20)
    got, _ = transfer(wire, data)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
    # The corrupted segments reached host a and its TCP threw them away.
    assert tcp_in_csum_errors(wire.a) > 0
    active, _ = wire_status(wire.w, wire.run_dir)
    assert active == shape
    stats_file = wire.run_dir / f"{wire.w}.impair.json"

    def counted() -> bool:
        stats = json.loads(stats_file.read_text())
        down = stats["b_to_a"]
        return bool(down["seen"] > 2500 and down["dropped"] and down["corrupted"])

    assert wait_until(counted, 3.0)  # the stats file is rewritten about once a second
    _, stats = wire_status(wire.w, wire.run_dir)
    down = stats["b_to_a"]
    assert down["duplicated"] > 0 and down["reordered"] > 0 and down["delayed"] > 0
    assert stats["a_to_b"]["seen"] > 0 and stats["a_to_b"]["delayed"] > 0
    assert stats["shell"]["injected"] > 0


def test_rate_20mbit_caps_throughput(wire: Wire) -> None:
    shape_wire(wire.w, LinkShape.parse(["rate=20mbit"]), wire.run_dir)
    data = pattern(3 << 20)
    got, elapsed = transfer(wire, data)
    assert got == data
    mbit = len(data) * 8 / elapsed / 1e6
    assert 12.0 <= mbit <= 21.5, mbit


def test_clear_wire_removes_everything_and_speed_returns(wire: Wire) -> None:
    shape_wire(wire.w, LinkShape.parse(["rate=20mbit", "delay=10ms", "loss=1%"]), wire.run_dir)
    pid = int((wire.run_dir / f"{wire.w}.impair.pid").read_text())
    clear_wire(wire.w, wire.run_dir)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert wire_status(wire.w, wire.run_dir) == (None, {})
    assert list(wire.run_dir.iterdir()) == []
    with NetNS(wire.w, flags=0) as w:
        for port in ("wa", "wb"):
            kinds = [q.get("kind") for q in w.get_qdiscs(index=w.link_lookup(ifname=port)[0])]
            assert "tbf" not in kinds
    data = pattern(8 << 20)
    got, elapsed = transfer(wire, data)
    assert got == data
    assert len(data) * 8 / elapsed / 1e6 > 100  # far above the 20 Mbit/s it had
    clear_wire(wire.w, wire.run_dir)  # a second clear is harmless


def test_killed_impair_process_leaves_traffic_flowing(wire: Wire) -> None:
    shape_wire(wire.w, LinkShape.parse(["delay=5ms"]), wire.run_dir)
    pid = int((wire.run_dir / f"{wire.w}.impair.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    assert wait_until(
        lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    )
    data = pattern(1 << 20, seed=2)
    got, _ = transfer(wire, data, timeout=10)
    assert got == data  # --queue-bypass: no listener means accept


def test_shape_wire_is_idempotent_and_replaces_the_shape(wire: Wire) -> None:
    shape_wire(wire.w, LinkShape.parse(["delay=30ms"]), wire.run_dir)
    shape_wire(wire.w, LinkShape.parse(["delay=5ms"]), wire.run_dir)
    assert wire_status(wire.w, wire.run_dir)[0] == LinkShape(delay_ms=5)
    assert connect_time(wire) < 0.025  # one rule, one process: 2 x 5 ms, not 2 x 35 ms


def test_missing_namespace_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ShapingError, match="does not exist"):
        shape_wire("tbi-no-such-ns", LinkShape(delay_ms=1), tmp_path)


def test_sigterm_releases_held_packets_writes_stats_and_exits_cleanly(wire: Wire) -> None:
    shape_wire(wire.w, LinkShape.parse(["delay=5ms"]), wire.run_dir)
    stats_file = wire.run_dir / f"{wire.w}.impair.json"
    pid = int((wire.run_dir / f"{wire.w}.impair.pid").read_text())
    data = pattern(256 << 10, seed=3)
    assert transfer(wire, data)[0] == data
    before = json.loads(stats_file.read_text())["time"]
    proc = psutil.Process(pid)
    proc.terminate()
    assert proc.wait(3) == 0
    final = json.loads(stats_file.read_text())
    assert final["time"] > before and final["held"] == 0
    assert final["b_to_a"]["seen"] > 150  # 256 KB in MTU-sized packets, not GSO lumps
