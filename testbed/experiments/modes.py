"""The paths a request can take through the proxy host, one per mode.

* ``router``: straight to the origin, the proxy namespace forwarding (kernel).
* ``plain``: our copy-loop SOCKS5 on kernel sockets (the thesis's "normal" proxy).
* ``endpoint``: SOCKS5 whose TCP connections the splice daemon terminates (copying).
* ``spliced``: the spliced SOCKS5 (the thesis's subject), when the testbed has it;
  its daemon runs the kernel fast path where BPF works (``auto``).
* ``spliced-kernel``: the testbed's kernel SOCKS5 (``socks5-kernel``): set-up on
  kernel sockets, then each pair handed to the same daemon
  (``splice_sockets``: taken over with TCP_REPAIR and spliced).
* ``spliced-kernel-after``: the same kernel SOCKS5 again, started here on the
  testbed's daemon with ``--splice-after 65536``: it copies each connection
  and hands it over only once 64 KB have crossed, so short requests never
  pay for a take-over (a copying proxy's cost) and long streams end up
  spliced after a pause.
* ``spliced-py``: the same proxy on a second daemon started here with
  ``--fastpath off`` (every spliced packet relayed in Python), on its own TUN
  and the upper half of the splice network (198.51.100.128/25, more specific
  than the testbed daemon's /24, so the kernel routes it there).
* ``dante``, ``microsocks``: Debian's SOCKS servers, started here in the proxy
  namespace for the run and stopped afterwards.

HTTP forward proxies (the client sends ``GET http://origin/...`` to them;
experiment 9, the keep-alive workload, is where they run):

* ``tinyproxy``: Debian's tinyproxy, started here like dante: a C proxy that
  copies, one thread per client connection, and the copying reference: it
  ends the client's connection after every response.
* ``http11``: the spliced HTTP/1.1 proxy, the testbed's ``http11-proxy``
  service (``Testbed.http11_proxy``): it keeps the client's connection and
  splices each response body (a bounded splice), handing the connections back
  in between.
* ``http11-copy``: a second instance of the same proxy, started here on the
  testbed's daemon, with ``--splice-min`` above any body: it copies every
  body itself.  Same parser, framing and daemon connections: the difference
  from ``http11`` is the splice alone.

A mode that cannot run (binary not installed, service missing) is *skipped*
with a reason the report prints; it never crashes the suite.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servers.address import format_host_port
from testbed import process
from testbed.topology import SPLICE_SOURCE

DANTE_PORT = 1090
MICROSOCKS_PORT = 1091
TINYPROXY_PORT = 8888  # tinyproxy's own default
HTTP11_COPY_PORT = 3130  # beside the testbed's http11-proxy on 3129
KERNEL_AFTER_PORT = 1083  # beside the testbed's kernel SOCKS5 on 1081
SPLICE_AFTER = 64 * 1024
COPY_EVERY_BODY = 1 << 62  # http11_proxy --splice-min: bodies shorter are copied
PY_NET = "198.51.100.128/25"
PY_SERVICE = "198.51.100.129"
PY_SOURCE = "198.51.100.130"
# The upper half of the testbed daemon's 2001:db8:d::/64, likewise.
PY_NET6 = "2001:db8:d:0:8000::/65"
PY_SERVICE6 = "2001:db8:d:0:8000::1"
PY_SOURCE6 = "2001:db8:d:0:8000::2"
PY_PORT = 1080


@dataclass(frozen=True, slots=True)
class SpliceDaemon:
    """The splice daemon a spliced mode runs on: VmRSS by PID, stats over its API."""

    pid: int
    socket: Path


@dataclass(frozen=True, slots=True)
class Mode:
    """A runnable mode: where the client connects, and whose CPU the cost counts."""

    name: str
    socks: tuple[str, int] | None  # None: direct to the origin (router), or an HTTP proxy
    cost_pids: tuple[int, ...]  # processes doing the proxy's work (children included)
    cost_note: str = ""
    # Spliced SOCKS5 modes only: experiment 8 holds idle SOCKS5 splices on it.
    splice_daemon: SpliceDaemon | None = None
    http_proxy: tuple[str, int] | None = None  # an HTTP forward proxy, requests in absolute-form


@dataclass(slots=True)
class ModeSet:
    """Modes resolved against one testbed, and the helper servers started for them."""

    modes: list[Mode] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # mode -> why
    started: list[subprocess.Popen[Any]] = field(default_factory=list)

    def names(self) -> list[str]:
        return [m.name for m in self.modes]

    def stop(self) -> None:
        """Stop what this set started (each in its own process group), by PID."""
        for proc in self.started:
            stop_group(proc)
        self.started.clear()


def dante_config(internal: str, port: int, external: str) -> str:
    """A minimal danted.conf: no authentication, everything allowed, log to stderr."""
    return textwrap.dedent(
        f"""\
        logoutput: stderr
        internal: {internal} port = {port}
        external: {external}
        clientmethod: none
        socksmethod: none
        user.privileged: root
        user.unprivileged: nobody
        client pass {{
            from: 0.0.0.0/0 to: 0.0.0.0/0
        }}
        client pass {{
            from: ::/0 to: ::/0
        }}
        socks pass {{
            from: 0.0.0.0/0 to: 0.0.0.0/0
        }}
        socks pass {{
            from: ::/0 to: ::/0
        }}
        """
    )


def tinyproxy_config(listen: str, port: int, bind: str) -> str:
    """A tinyproxy.conf as Debian ships it where it matters, for a run in a namespace.

    No Allow line: every client is allowed (the proxy listens on the client
    link only).  Timeout and MaxClients are the defaults but for MaxClients,
    raised so the experiment's workers never queue.  Via stays on, as in the
    default configuration.  LogLevel Warning: tinyproxy logs two lines per
    connection at its default, Info, and the log is not what is measured.  It
    runs as root (no User line): it warns, and needs no user to exist.
    """
    return textwrap.dedent(
        f"""\
        Port {port}
        Listen {listen}
        Bind {bind}
        Timeout 600
        MaxClients 256
        LogLevel Warning
        """
    )


def stop_group(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """SIGTERM the process group `proc` leads (netns.popen made it), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


_WAIT_PORT = """
import socket, sys, time
deadline = time.monotonic() + float(sys.argv[3])
while True:
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(1)
        time.sleep(0.05)
"""


def _wait_port(tb: Any, addr: str, port: int, proc: subprocess.Popen[Any], log: Path) -> str:
    """'' once addr:port accepts in the proxy namespace, else why not."""
    res = tb.host("proxy").cmd(
        [sys.executable, "-c", _WAIT_PORT, addr, str(port), "10"], timeout=20
    )
    if res.returncode == 0 and proc.poll() is None:
        return ""
    stop_group(proc)
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
    return f"did not accept on {addr}:{port}" + (f" ({tail[0]})" if tail else "")


def _service_mode(
    tb: Any,
    found: ModeSet,
    name: str,
    services: list[str],
    socks: tuple[str, int],
    note: str,
) -> None:
    """Mode ``name``, measured through ``socks``, if the testbed runs all of ``services``."""
    pids, missing = _record_pids(tb.run_dir, services)
    if missing:
        found.skipped[name] = f"testbed service(s) not running: {', '.join(missing)}"
    else:
        found.modes.append(Mode(name, (socks[0], socks[1]), pids, note))


def _record_pids(run_dir: Path, names: list[str]) -> tuple[tuple[int, ...], list[str]]:
    pids, missing = [], []
    for name in names:
        rec = process.load(run_dir, name)
        if rec is not None and rec.alive():
            pids.append(rec.pid)
        else:
            missing.append(name)
    return tuple(pids), missing


def _spliced_processes(run_dir: Path) -> list[str]:
    """The spliced proxy's service records (any record naming a splice, not the daemon)."""
    return [
        rec.name for rec in process.records(run_dir) if "splic" in rec.name and rec.name != "daemon"
    ]


def resolve(tb: Any, wanted: tuple[str, ...], work_dir: Path) -> ModeSet:
    """Resolve `wanted` against testbed `tb`, starting dante/microsocks as needed.

    The caller must call `.stop()` on the result (in a finally).
    """
    found = ModeSet()
    # In the family the suite runs in (testbed/experiments/family.py): the
    # client-side address to listen on, the server-side one to leave from.
    proxy_addr = tb.socks[0]
    external = tb.host("proxy").addrs[-1]
    for name in wanted:
        if name == "router":
            found.modes.append(
                Mode(name, None, (), "kernel forwarding: no process; see machine-wide CPU")
            )
        elif name == "plain":
            pids, missing = _record_pids(tb.run_dir, ["socks5"])
            if missing:
                found.skipped[name] = "the testbed's plain SOCKS5 service is not running"
            else:
                found.modes.append(Mode(name, tuple(tb.socks), pids))
        elif name == "endpoint":
            services = ["daemon", "socks5-endpoint"]
            _service_mode(tb, found, name, services, tb.endpoint_socks, "daemon + endpoint SOCKS5")
        elif name == "spliced":
            if not hasattr(tb, "spliced_socks"):
                found.skipped[name] = (
                    "the testbed has no spliced SOCKS5 yet (Testbed.spliced_socks is missing)"
                )
                continue
            names = ["daemon", *_spliced_processes(tb.run_dir)]
            pids, missing = _record_pids(tb.run_dir, names)
            if missing:
                found.skipped[name] = f"testbed service(s) not running: {', '.join(missing)}"
            else:
                found.modes.append(
                    Mode(
                        name,
                        tuple(tb.spliced_socks),
                        pids,
                        "daemon + " + ", ".join(names[1:]),
                        SpliceDaemon(pids[0], tb.daemon_socket),  # "daemon" comes first
                    )
                )
        elif name == "spliced-kernel":
            # Kernel sockets, each pair handed to the same daemon (splice_sockets).
            # Not in experiment 8: that daemon's memory is measured with "spliced".
            services = ["daemon", "socks5-kernel"]
            _service_mode(tb, found, name, services, tb.kernel_socks, "daemon + socks5-kernel")
        elif name == "spliced-kernel-after":
            _start_kernel_after(tb, found, work_dir)
        elif name == "spliced-py":
            _start_spliced_py(tb, found, work_dir)
        elif name == "dante":
            binary = shutil.which("danted")
            if binary is None:
                found.skipped[name] = "danted is not installed (Debian package dante-server)"
                continue
            conf = work_dir / "danted.conf"
            conf.write_text(dante_config(proxy_addr, DANTE_PORT, external))
            argv = [binary, "-f", str(conf), "-N", "2"]
            _start(tb, found, name, argv, work_dir, proxy_addr, DANTE_PORT)
        elif name == "microsocks":
            binary = shutil.which("microsocks")
            if binary is None:
                found.skipped[name] = "microsocks is not installed (Debian package microsocks)"
                continue
            argv = [binary, "-i", proxy_addr, "-p", str(MICROSOCKS_PORT), "-b", external]
            _start(tb, found, name, argv, work_dir, proxy_addr, MICROSOCKS_PORT)
        elif name == "tinyproxy":
            binary = shutil.which("tinyproxy")
            if binary is None:
                found.skipped[name] = "tinyproxy is not installed (Debian package tinyproxy-bin)"
                continue
            conf = work_dir / "tinyproxy.conf"
            conf.write_text(tinyproxy_config(proxy_addr, TINYPROXY_PORT, external))
            argv = [binary, "-d", "-c", str(conf)]  # -d: in the foreground, its PID is ours
            _start(
                tb,
                found,
                name,
                argv,
                work_dir,
                proxy_addr,
                TINYPROXY_PORT,
                http=True,
                note="a thread per connection",
            )
        elif name == "http11":
            if not hasattr(tb, "http11_proxy"):
                found.skipped[name] = (
                    "the testbed has no spliced HTTP/1.1 proxy (Testbed.http11_proxy is missing)"
                )
                continue
            pids, missing = _record_pids(tb.run_dir, ["daemon", "http11-proxy"])
            if missing:
                found.skipped[name] = f"testbed service(s) not running: {', '.join(missing)}"
            else:
                found.modes.append(
                    Mode(
                        name,
                        None,
                        pids,
                        "daemon + http11-proxy",
                        http_proxy=tuple(tb.http11_proxy),
                    )
                )
        elif name == "http11-copy":
            _start_http11_copy(tb, found, work_dir)
    return found


def _start(
    tb: Any,
    found: ModeSet,
    name: str,
    argv: list[str],
    work_dir: Path,
    addr: str,
    port: int,
    *,
    http: bool = False,
    note: str = "with its child processes",
    env: dict[str, str] | None = None,
    pids: tuple[int, ...] = (),
    what: str | None = None,
) -> None:
    """Start ``argv`` in the proxy host and record it as mode ``name`` once it listens.

    ``pids``: processes the mode also counts (its daemon); ``what``: how a
    failure names it (default: the program's file name).  A proxy refusing
    its options exits at once (usage error): its log says so.
    """
    log = work_dir / f"{name}.log"
    with open(log, "wb") as out:
        proc = tb.host("proxy").popen(
            argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL, env=env
        )
    why = _wait_port(tb, addr, port, proc, log)
    if why:
        found.skipped[name] = f"{what or Path(argv[0]).name} {why}"
        return
    found.started.append(proc)
    counted = (*pids, proc.pid)
    if http:
        found.modes.append(Mode(name, None, counted, note, http_proxy=(addr, port)))
    else:
        found.modes.append(Mode(name, (addr, port), counted, note))


def _python_env() -> dict[str, str]:
    """The environment for a module of this checkout run in a namespace."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _start_on_daemon(
    tb: Any,
    found: ModeSet,
    work_dir: Path,
    name: str,
    module: str,
    listen: tuple[str, int],
    options: list[str],
    note: str,
    *,
    http: bool = False,
) -> None:
    """One more proxy ``module`` on the testbed's daemon, listening on ``listen``."""
    pids, missing = _record_pids(tb.run_dir, ["daemon"])
    if missing:
        found.skipped[name] = "the testbed's splice daemon is not running"
        return
    addr, port = listen
    argv = [
        sys.executable, "-m", module,
        "--daemon", str(tb.daemon_socket),
        "--listen", format_host_port(addr, port),
        *options,
    ]  # fmt: skip
    _start(
        tb, found, name, argv, work_dir, addr, port,
        http=http, note=note, env=_python_env(), pids=tuple(pids), what=module,
    )  # fmt: skip


def _start_kernel_after(tb: Any, found: ModeSet, work_dir: Path) -> None:
    """The kernel SOCKS5 again, on the testbed's daemon, splicing after 64 KB."""
    _start_on_daemon(
        tb,
        found,
        work_dir,
        "spliced-kernel-after",
        "proxies.socks5_kernel",
        (tb.kernel_socks[0], KERNEL_AFTER_PORT),
        ["--splice-after", str(SPLICE_AFTER)],
        f"daemon + socks5_kernel --splice-after {SPLICE_AFTER}",
    )


def _start_http11_copy(tb: Any, found: ModeSet, work_dir: Path) -> None:
    """The HTTP/1.1 proxy again, on the testbed's daemon, copying every body (http11-copy)."""
    name = "http11-copy"
    if not hasattr(tb, "http11_proxy"):
        found.skipped[name] = "the testbed has no HTTP/1.1 proxy (Testbed.http11_proxy is missing)"
        return
    options = [
        "--source",
        SPLICE_SOURCE,
        "--splice-min",
        str(COPY_EVERY_BODY),
        # The daemon's default receive buffering, as a copying proxy wants it
        # (the spliced one keeps 64 KB, so that bodies wait at the origin).
        "--origin-rcvbuf",
        "0",
    ]
    _start_on_daemon(
        tb,
        found,
        work_dir,
        name,
        "proxies.http11_proxy",
        (tb.http11_proxy[0], HTTP11_COPY_PORT),
        options,
        "daemon + http11-proxy --splice-min (copies)",
        http=True,
    )


def _start_spliced_py(tb: Any, found: ModeSet, work_dir: Path) -> None:
    """A second daemon, fast path off, and a spliced SOCKS5 proxy on it (mode spliced-py)."""
    sock = work_dir / "spliced-py.sock"
    env = _python_env()
    daemon_argv = [
        sys.executable,
        "-m",
        "daemon",
        "--tun",
        (tb.prefix + "-tunpy")[:15],
        "--prefix",
        PY_NET,
        "--source",
        PY_SOURCE,
        "--prefix6",
        PY_NET6,
        "--source6",
        PY_SOURCE6,
        "--socket",
        str(sock),
        "--fastpath",
        "off",
    ]
    log = work_dir / "spliced-py-daemon.log"
    with open(log, "wb") as out:
        daemon = tb.host("proxy").popen(
            daemon_argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL, env=env
        )
    found.started.append(daemon)
    if not _wait_file(sock, daemon):
        found.skipped["spliced-py"] = "the second splice daemon did not start (see its log)"
        return
    proxy_argv = [
        sys.executable,
        "-m",
        "proxies.socks5_spliced",
        "--daemon",
        str(sock),
        "--source",
        PY_SOURCE,
        "--listen",
        f"{PY_SERVICE}:{PY_PORT}",
        "--listen",
        f"[{PY_SERVICE6}]:{PY_PORT}",
    ]
    service = PY_SERVICE6 if getattr(tb, "family", 4) == 6 else PY_SERVICE
    plog = work_dir / "spliced-py-proxy.log"
    with open(plog, "wb") as out:
        proxy = tb.host("proxy").popen(
            proxy_argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL, env=env
        )
    why = _wait_port(tb, service, PY_PORT, proxy, plog)
    if why:
        found.skipped["spliced-py"] = f"spliced SOCKS5 on the second daemon {why}"
        return
    found.started.append(proxy)
    found.modes.append(
        Mode(
            "spliced-py",
            (service, PY_PORT),
            (daemon.pid, proxy.pid),
            "daemon (--fastpath off) + spliced SOCKS5",
            SpliceDaemon(daemon.pid, sock),
        )
    )


def _wait_file(path: Path, proc: subprocess.Popen[Any], timeout: float = 15.0) -> bool:
    """True once `path` exists (the daemon's API socket), False if `proc` died first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False
