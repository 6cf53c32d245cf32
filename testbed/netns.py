"""Network namespaces: create, remove, run code and programs inside them.

Namespaces are the named kind that `ip netns` also sees (a bind mount under
/run/netns), created and removed through pyroute2, never by shelling out to
`ip`.  Programs are started inside a namespace by a setns(2) in the child
between fork and exec, so no helper binary (nsenter, ip) is needed.

Per-namespace configuration follows `ip netns exec`'s convention: a file in
/etc/netns/NAME/ (``hosts``, say) is bind-mounted over its namesake in /etc
for programs started in NAME, inside a mount namespace of their own, so the
machine's /etc stays as it is.  The testbed gives its hosts names that way
(testbed/net.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import netns as _pr_netns

NETNS_RUN_DIR = Path("/run/netns")
NETNS_ETC_DIR = Path("/etc/netns")
_CLONE_NEWNET = 0x40000000
_CLONE_NEWNS = 0x00020000
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_SLAVE = 0x80000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
T = TypeVar("T")


class NamespaceError(RuntimeError):
    """A namespace operation failed; the message says which namespace and why."""


def exists(name: str) -> bool:
    return (NETNS_RUN_DIR / name).exists()


def create(name: str) -> None:
    """Create namespace `name` if it does not exist yet (idempotent)."""
    if not exists(name):
        _pr_netns.create(name)


def remove(name: str) -> None:
    """Remove namespace `name`; its interfaces vanish with it.  Idempotent."""
    if exists(name):
        _pr_netns.remove(name)


def list_names(prefix: str) -> list[str]:
    """Names of the existing namespaces that start with `prefix`."""
    if not NETNS_RUN_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_RUN_DIR.iterdir() if p.name.startswith(prefix))


def inode(name: str) -> int:
    """The namespace's identity (inode of its nsfs file), to find processes inside it."""
    return os.stat(NETNS_RUN_DIR / name).st_ino


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def write_etc(name: str, filename: str, text: str) -> Path:
    """/etc/netns/``name``/``filename``: what programs in ``name`` see as /etc/``filename``."""
    d = NETNS_ETC_DIR / name
    d.mkdir(parents=True, exist_ok=True)
    path = d / filename
    path.write_text(text)
    return path


def remove_etc(name: str) -> None:
    """Remove /etc/netns/``name`` (only that namespace's directory).  Idempotent.

    /etc/netns itself goes too once empty (``write_etc`` may have made it);
    a directory someone else keeps something in stays.
    """
    d = NETNS_ETC_DIR / name
    if d.is_dir():
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
    with contextlib.suppress(OSError):  # absent, or not empty: not ours to remove
        NETNS_ETC_DIR.rmdir()


def _mount(source: str | None, target: str, flags: int) -> None:
    src = source.encode() if source is not None else None
    if _libc.mount(src, target.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def _preexec(name: str) -> Callable[[], None]:
    path = str(NETNS_RUN_DIR / name)
    if not exists(name):
        raise NamespaceError(f"namespace {name!r} does not exist (is the testbed up?)")
    etc = NETNS_ETC_DIR / name
    overlays = [
        (str(f), f"/etc/{f.name}")
        for f in (sorted(etc.iterdir()) if etc.is_dir() else [])
        if f.is_file() and Path("/etc", f.name).exists()
    ]

    def enter() -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            _setns(fd)
        finally:
            os.close(fd)
        if overlays:
            # A mount namespace of the child's own, whose mounts never
            # propagate back (slave), as `ip netns exec` makes one.
            if _libc.unshare(_CLONE_NEWNS) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"unshare(CLONE_NEWNS): {os.strerror(err)}")
            _mount(None, "/", _MS_SLAVE | _MS_REC)
            for source, target in overlays:
                _mount(source, target, _MS_BIND)
        os.setsid()  # own process group: stopping it never signals our caller

    return enter


def popen(name: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Start `argv` inside namespace `name` (in its own session/process group)."""
    return subprocess.Popen(list(argv), preexec_fn=_preexec(name), **kwargs)


def run(
    name: str,
    argv: Sequence[str],
    *,
    check: bool = False,
    timeout: float | None = 60,
    **kwargs: Any,
) -> subprocess.CompletedProcess[str]:
    """Run `argv` inside namespace `name` to completion, capturing text output."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    return subprocess.run(
        list(argv), preexec_fn=_preexec(name), check=check, timeout=timeout, **kwargs
    )


def write_sysctl(name: str, key: str, value: str | int) -> None:
    """Set a sysctl inside namespace `name`.

    /proc/sys/net is per network namespace as seen by the *opener*, so the
    write happens in a short-lived child that entered the namespace.
    """
    path = "/proc/sys/" + key.replace(".", "/")
    # A refused value surfaces only when the file is closed: close it here.
    code = "import sys\nwith open(sys.argv[1], 'w') as f: f.write(sys.argv[2])"
    res = run(name, [sys.executable, "-c", code, path, str(value)], timeout=10)
    if res.returncode != 0:
        msg = res.stderr.strip().splitlines()[-1:] or ["unknown error"]
        raise NamespaceError(f"sysctl {key}={value} in {name}: {msg[0]}")


def read_sysctl(name: str, key: str) -> str:
    path = "/proc/sys/" + key.replace(".", "/")
    code = "import sys; print(open(sys.argv[1]).read().strip())"
    res = run(name, [sys.executable, "-c", code, path], timeout=10)
    if res.returncode != 0:
        raise NamespaceError(f"sysctl {key} in {name}: {res.stderr.strip()}")
    return res.stdout.strip()


def pids_in(name: str) -> list[int]:
    """PIDs of the processes whose network namespace is `name`."""
    if not exists(name):
        return []
    target = inode(name)
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino == target:
                found.append(int(entry))
        except OSError:
            continue  # the process exited while we looked
    return found


def call_in(name: str, fn: Callable[[], T]) -> T:
    """``fn()`` on a thread that entered namespace ``name``; its result, or its exception.

    What a thread creates there stays there (a socket is of the namespace it
    was made in), and what looks up "the current namespace" (a BPF program
    run with BPF_PROG_TEST_RUN, /proc/sys/net opened) sees ``name``; the
    calling thread's namespace does not change.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(NETNS_RUN_DIR / name, os.O_RDONLY)
            try:
                _setns(fd)
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=run, name=f"in-{name}")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
