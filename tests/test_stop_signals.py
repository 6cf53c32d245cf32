"""Stopping a run cleanly: SIGTERM as Ctrl-C, and a testbed teardown that a signal
cannot cut in half (testbed.process.sigterm_as_ctrl_c, testbed.net's down())."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import pytest

from testbed.net import _stop_signals_held
from testbed.process import sigterm_as_ctrl_c


@pytest.fixture
def restore_sigterm() -> Iterator[None]:
    before = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def test_sigterm_raises_keyboard_interrupt_here(restore_sigterm: None) -> None:
    sigterm_as_ctrl_c()
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGTERM)
        signal.sigtimedwait([], 0)  # a bytecode boundary for the handler to run at


def test_a_forked_child_still_dies_of_sigterm(restore_sigterm: None) -> None:
    """pyroute2 stops its forked helpers with SIGTERM: the handler must not keep them alive."""
    sigterm_as_ctrl_c()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: wait for the signal, never return into pytest
        try:
            # Ready only now: CPython drops signals that arrive while a child
            # is still re-initialising after fork.
            os.write(ready_w, b"!")
            while True:
                signal.pause()
        finally:
            os._exit(3)  # reached only if SIGTERM became an exception
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"!"
    os.close(ready_r)
    os.kill(pid, signal.SIGTERM)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM


def test_signals_wait_until_teardown_is_over(restore_sigterm: None) -> None:
    seen: list[str] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: seen.append("term"))
    with _stop_signals_held():
        # To this thread: a process-directed kill may go to any other thread
        # of the pytest process that does not block it (a library's helper
        # thread), and then nothing is held here.
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGTERM)
        for _ in range(1000):  # plenty of bytecode boundaries: still held
            pass
        assert seen == []
    assert seen == ["term"]
