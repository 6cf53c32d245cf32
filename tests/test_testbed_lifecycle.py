"""The testbed's lifecycle: up/down idempotent, repairs, exact cleanup, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from testbed import netns, process
from testbed.net import Testbed, TestbedError
from testbed.process import ServiceError
from tests.conftest import unique_prefix

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "testbed", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def test_up_twice_is_harmless_and_down_removes_everything() -> None:
    tb = Testbed(unique_prefix())
    try:
        first = tb.up()
        assert any(line.startswith("namespace") for line in first)
        assert "service origin" in first and "service socks5" in first
        assert tb.up() == []  # second up: nothing to do
        status = tb.status()
        assert status["up"] and all(s["alive"] for s in status["services"].values())
        pids = [rec.pid for rec in process.records(tb.run_dir)]
        assert len(pids) == 8  # origin, plain socks5, daemon, 5 daemon proxies
        etc = [netns.NETNS_ETC_DIR / tb.host(role).ns for role in ("client", "proxy", "server")]
        assert all((d / "hosts").is_file() for d in etc)
    finally:
        tb.down()
    assert netns.list_names(tb.prefix + "-") == []
    assert not tb.run_dir.exists()
    assert not any(d.exists() for d in etc)  # the hosts files went with the namespaces
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid)
    assert tb.down() == []  # second down: nothing left to remove


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def test_up_repairs_a_removed_wire() -> None:
    tb = Testbed(unique_prefix(), services=False)
    try:
        tb.up()
        link = tb.link("client-proxy")
        netns.remove(link.wire_ns)  # takes the wire's veth ends, and so the link, with it
        assert not tb.is_up()
        done = tb.up()
        assert f"namespace {link.wire_ns}" in done and "link client-proxy" in done
        out = tb.host("client").cmd(
            [sys.executable, "-c", "import socket; socket.create_connection(('192.0.2.1', 9), 3)"]
        )
        # The proxy answers a closed port with RST: the link is back.
        assert "ConnectionRefusedError" in out.stderr
    finally:
        tb.down()


def test_down_after_a_crash_removes_namespaces_processes_and_files() -> None:
    prefix = unique_prefix()
    crash = f"""
        import os, subprocess
        from testbed.net import Testbed
        from testbed import netns
        tb = Testbed({prefix!r})
        tb.up()
        stray = netns.popen(tb.host("client").ns, ["sleep", "600"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(stray.pid, flush=True)
        os._exit(3)  # die without down(), as a crashed test would
    """
    try:
        res = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(crash)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )
        assert res.returncode == 3, res.stderr
        stray = int(res.stdout.split()[0])
        tb = Testbed(prefix)
        services = [rec.pid for rec in process.records(tb.run_dir)]
        assert len(services) == 8 and Path(f"/proc/{stray}").exists()
    finally:
        Testbed(prefix).down()
    assert netns.list_names(prefix + "-") == []
    assert not (Path("/run/tcp-splice") / prefix).exists()
    assert not list(netns.NETNS_ETC_DIR.glob(prefix + "-*"))
    for pid in [*services, stray]:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid)


def test_cli_up_without_root_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A real unprivileged user cannot even exec this venv's interpreter here
    # (it lives under /root), so the check is driven through geteuid.
    from testbed import cli as testbed_cli

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    prefix = unique_prefix()
    assert testbed_cli.main(["--prefix", prefix, "up"]) == 2
    err = capsys.readouterr().err
    assert "needs root" in err and "Traceback" not in err
    assert netns.list_names(prefix) == []


def test_cli_rejects_unknown_host_link_and_bad_prefix(testbed: Testbed) -> None:
    res = cli("--prefix", testbed.prefix, "shape", "nosuchlink", "delay=1ms")
    assert res.returncode == 2 and "unknown link 'nosuchlink'" in res.stderr
    res = cli("--prefix", testbed.prefix, "exec", "nosuchhost", "--", "true")
    assert res.returncode == 2 and "invalid choice" in res.stderr
    res = cli("--prefix", "Bad_Prefix!", "status")
    assert res.returncode == 2 and "bad prefix" in res.stderr
    with pytest.raises(TestbedError, match="unknown host"):
        testbed.host("router")


def test_cli_exec_runs_in_the_host(testbed: Testbed) -> None:
    res = cli(
        "--prefix",
        testbed.prefix,
        "exec",
        "server",
        "--",
        sys.executable,
        "-c",
        "import socket; socket.socket().bind(('203.0.113.2', 0))",
    )
    assert res.returncode == 0, res.stderr  # 203.0.113.2 is local only in the server


def test_a_port_already_taken_fails_clearly() -> None:
    tb = Testbed(unique_prefix(), services=False)
    try:
        tb.up()
        squatter = tb.host("proxy").popen(
            [
                sys.executable,
                "-c",
                "import socket, time; s = socket.socket(); s.bind(('192.0.2.1', 1080)); "
                "s.listen(); print('ready', flush=True); time.sleep(600)",
            ],
            stdout=subprocess.PIPE,
        )
        try:
            assert squatter.stdout is not None and squatter.stdout.readline().strip() == b"ready"
            with pytest.raises(ServiceError, match="socks5"):
                tb.start_services()
            res = cli("--prefix", tb.prefix, "up")
            assert res.returncode == 2 and "socks5" in res.stderr
        finally:
            squatter.kill()
            squatter.wait()
    finally:
        tb.down()
