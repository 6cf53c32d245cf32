"""Least privilege: the daemon needs CAP_NET_ADMIN and CAP_BPF and nothing else.

The daemon runs under ``setpriv --bounding-set=-all,+net_admin,+bpf``:
whatever it is started as, it can hold no other capability (checked in
/proc/PID/status).  With those two it opens its TUN, loads and attaches the
fast path, and splices a transfer whose bytes the kernel carries.  Without
CAP_BPF, ``--fastpath auto`` falls back to the Python relay with one log
line and ``--fastpath on`` refuses to start with a clear message.

splice_sockets (the kernel SOCKS5's op) takes CAP_PERFMON too, for its
socket probe: without it the proxy is told so; with it a proxy running as
another user than the daemon has its pair taken over and the server side's
port held.

The API socket's group is the access control (docs/operations.md): a
process outside it is refused by the kernel, one in it can attach.  Those
clients are forked children that drop to an unprivileged uid (no exec, so
no interpreter path permissions matter).
"""

from __future__ import annotations

import encodings.idna  # noqa: F401  (socket's host names; a child dropped to another uid cannot load it)
import errno
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.api.client import SpliceClient
from testbed import netns
from testbed.net import Testbed
from tests.conftest import unique_prefix
from tests.helpers import curl_sha256, daemon_stats, pattern_sha256, run_py
from tests.sockutil import wait_until
from tests.test_splice_sockets import CONNECT_ORIGIN

pytestmark = pytest.mark.root

CAP_NET_ADMIN = 12
CAP_BPF = 39
API_GID = 64002  # a group that owns the API socket; no /etc/group entry needed
# The daemon is in the socket's group (as a systemd unit's Group= makes it):
# without CAP_CHOWN it can give its socket only to a group of its own.
WRAPPER = ("setpriv", f"--groups={API_GID}", "--bounding-set=-all,+net_admin,+bpf", "--")
WRAPPER_PERFMON = (
    "setpriv",
    f"--groups={API_GID}",
    "--bounding-set=-all,+net_admin,+bpf,+perfmon",
    "--",
)
CAP_PERFMON = 38


def _capped_testbed(wrapper: tuple[str, ...]) -> Iterator[Testbed]:
    bed = Testbed(
        unique_prefix(),
        msl=1.0,
        fastpath="on",
        daemon_wrapper=wrapper,
        daemon_args=("--socket-group", str(API_GID), "--socket-mode", "0660"),
    )
    try:
        bed.up()
        yield bed
    finally:
        bed.down()


@pytest.fixture(scope="module")
def capped() -> Iterator[Testbed]:
    yield from _capped_testbed(WRAPPER)


@pytest.fixture(scope="module")
def capped_perfmon() -> Iterator[Testbed]:
    """The daemon with CAP_PERFMON too: what kernel-socket splices need (the socket probe)."""
    yield from _capped_testbed(WRAPPER_PERFMON)


def _caps(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_the_daemon_holds_only_net_admin_and_bpf_and_still_splices_in_the_kernel(
    capped: Testbed,
) -> None:
    pid = capped.status()["services"]["daemon"]["pid"]
    wanted = (1 << CAP_NET_ADMIN) | (1 << CAP_BPF)
    assert _caps(pid, "CapEff") == wanted
    assert _caps(pid, "CapBnd") == wanted
    before = daemon_stats(capped)
    assert before["fast_path"]["running"] is True
    size = 8 << 20
    url = "http://{}:{}/bytes/{}".format(*capped.origin, size)
    rc, digest = curl_sha256(
        capped.host("client"), url, "--socks5", "{}:{}".format(*capped.spliced_socks)
    )
    assert rc == 0 and digest == pattern_sha256(size)
    after = daemon_stats(capped)
    carried = (
        after["fast_path"]["counters"]["redirected_bytes"]
        - before["fast_path"]["counters"]["redirected_bytes"]
    )
    assert carried > size // 2  # the map updates worked with CAP_BPF alone


def _connect_as(path: Path, uid: int, groups: list[int]) -> str:
    """Connect to ``path`` from a forked child running as ``uid``: 'ok' or the error."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop, try, report, exit without cleanup
        try:
            os.close(r)
            os.setgroups(groups)
            os.setgid(uid)
            os.setuid(uid)
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(5)
                    s.connect(str(path))
                    s.sendall(b'{"id":1,"op":"hello","version":1}\n')
                    answer = s.recv(4096)
                result = "ok" if b'"ok":true' in answer.replace(b" ", b"") else repr(answer)
            except OSError as exc:
                result = type(exc).__name__
            os.write(w, result.encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            return f.read().decode()
    finally:
        os.waitpid(pid, 0)


def test_the_api_socket_admits_its_group_and_refuses_others(capped: Testbed) -> None:
    st = capped.daemon_socket.stat()
    assert (st.st_gid, st.st_mode & 0o777) == (API_GID, 0o660)
    assert _connect_as(capped.daemon_socket, 64003, [API_GID]) == "ok"
    assert _connect_as(capped.daemon_socket, 64004, []) == "PermissionError"


PROXY_UID = 64005
KERNEL_PROXY_PORT = 7081


def _kernel_proxy_as(tb: Testbed, uid: int) -> tuple[int, int]:
    """A one-connection kernel-socket proxy in a forked child running as ``uid``.

    It listens on the proxy host, accepts one client, connects to the origin
    and hands both kernel sockets to the daemon (``splice_sockets``), as the
    kernel SOCKS5 does after its reply; it reports on the pipe it returns
    ('ready', then 'spliced' or the error).  No exec: nothing of the
    checkout need be readable by ``uid``.  Returns (pid, read end).
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            fd = os.open(str(netns.NETNS_RUN_DIR / tb.host("proxy").ns), os.O_RDONLY)
            netns._setns(fd)
            lst = socket.socket()
            lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lst.bind((tb.topology.gateways["client"], KERNEL_PROXY_PORT))
            lst.listen()
            os.setgroups([API_GID])
            os.setgid(uid)
            os.setuid(uid)
            os.write(w, b"ready\n")
            lst.settimeout(20)
            client, _ = lst.accept()
            server = socket.create_connection(tb.origin, timeout=10)
            with SpliceClient(str(tb.daemon_socket)) as api:
                api.splice_sockets(client, server)
            client.close()
            server.close()
            os.write(w, b"spliced\n")
        except BaseException as exc:
            os.write(w, f"{type(exc).__name__}: {exc}\n".encode())
        finally:
            os._exit(0)
    os.close(w)
    return pid, r


def test_kernel_socket_splices_need_perfmon_and_say_so(capped: Testbed) -> None:
    """splice_sockets reads each socket's kernel state with a BPF probe that the
    verifier accepts only with CAP_PERFMON; without it the proxy is told which
    capability is missing (EOPNOTSUPP), not only the verifier's log."""
    pid, r = _kernel_proxy_as(capped, PROXY_UID)
    try:
        with os.fdopen(r, "r") as report:
            assert report.readline().strip() == "ready"
            url = "http://{}:{}/bytes/1024".format(
                capped.topology.gateways["client"], KERNEL_PROXY_PORT
            )
            curl_sha256(capped.host("client"), url, timeout=10)  # the proxy closes: no body
            said = report.readline().strip()
        assert said.startswith("SpliceError: EOPNOTSUPP"), said
        assert "needs CAP_PERFMON" in said, said
    finally:
        os.waitpid(pid, 0)


def test_a_proxy_of_another_user_has_its_spliced_ports_held(capped_perfmon: Testbed) -> None:
    """The daemon keeps a taken-over connection's local port bound while the splice
    lives (repair.hold_port), so that connect() does not hand it out again.  Beside
    the live socket that takes SO_REUSEPORT, which Linux grants only to the socket's
    own user; a proxy of another user (the deployment docs/operations.md describes)
    got no hold at all.  Now the daemon binds the port once it has disconnected the
    socket.  With one ephemeral port, a second connect() finds none while the hold
    lives."""
    proxy = capped_perfmon.host("proxy")
    key = "net.ipv4.ip_local_port_range"
    old = proxy.cmd(["sysctl", "-n", key], check=True).stdout.split()

    def holds() -> int:
        return int(daemon_stats(capped_perfmon)["splice_counters"]["port_holds"])

    assert wait_until(lambda: holds() == 0), holds()
    proxy.cmd(["sysctl", "-w", f"{key}=40000 40000"], check=True)
    pid = None
    try:
        pid, r = _kernel_proxy_as(capped_perfmon, PROXY_UID)
        with os.fdopen(r, "r") as report:
            assert report.readline().strip() == "ready"
            url = "http://{}:{}/bytes/1024".format(
                capped_perfmon.topology.gateways["client"], KERNEL_PROXY_PORT
            )
            rc, digest = curl_sha256(capped_perfmon.host("client"), url)
            said = report.readline().strip()
            assert said == "spliced", said
            assert rc == 0 and digest == pattern_sha256(1024)
        os.waitpid(pid, 0)
        pid = None
        assert holds() == 1
        connect = run_py(proxy, CONNECT_ORIGIN, *map(str, capped_perfmon.origin)).strip()
        assert connect == f"errno {errno.EADDRNOTAVAIL}"
        assert wait_until(lambda: holds() == 0), holds()
        assert (
            run_py(proxy, CONNECT_ORIGIN, *map(str, capped_perfmon.origin)).strip() == "port 40000"
        )
    finally:
        if pid is not None:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        proxy.cmd(["sysctl", "-w", f"{key}={old[0]} {old[1]}"], check=True)


def _start_daemon(tb: Testbed, wrapper: tuple[str, ...], fastpath: str) -> tuple[int | None, str]:
    """A second daemon in tb's proxy namespace: (None if it got ready, else its rc; its log)."""
    sock = tb.run_dir / f"capless-{fastpath}.sock"
    argv = [
        *wrapper,
        sys.executable,
        "-m",
        "daemon",
        "--tun",
        (tb.prefix + "-tcl")[:15],
        "--prefix",
        "198.51.100.128/25",
        "--source",
        "198.51.100.130",
        "--socket",
        str(sock),
        "--fastpath",
        fastpath,
    ]
    proc = tb.host("proxy").popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    try:
        # "ready" comes once everything is set up, the fast path (or the
        # fallback) included; the API socket exists before that.
        lines: list[str] = []
        for line in proc.stdout:
            lines.append(line)
            if line.strip() == "ready":
                proc.terminate()
                break
        out, _ = proc.communicate(timeout=20)
        started = bool(lines) and lines[-1].strip() == "ready"
        return (None if started else proc.returncode), "".join(lines) + out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_without_cap_bpf_auto_falls_back_and_on_refuses(capped: Testbed) -> None:
    no_bpf = ("setpriv", "--bounding-set=-all,+net_admin", "--")
    rc, log = _start_daemon(capped, no_bpf, "auto")
    assert rc is None, log  # it started
    assert "fast path off, spliced flows stay in the daemon" in log, log
    rc, log = _start_daemon(capped, no_bpf, "on")
    assert rc == 1, log
    assert "--fastpath on, but the fast path cannot run" in log, log
