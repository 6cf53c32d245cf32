"""When the splicer puts a splice into the kernel fast path: after what the TUN holds.

A segment the kernel punted before its entry existed can wait in the TUN's
queue; installed at once, the entry lets the flow's next segment overtake
it (a capture of test_splice_bounded_ns showed it: the server's 8 KB
segment on the client link after the 14 KB one it sent next).  The splicer
therefore installs at the end of the loop pass, after reading the TUN dry.
These tests drive daemon/io/splicer.py with a real relay and recording
fakes for the daemon and the fast path.
"""

from __future__ import annotations

from typing import Any

from daemon.io.splicer import Splice, Splicer
from daemon.splice.relay import InstallFastPath, TearDown, WatchFinAck
from daemon.splice.state import CLIENT
from daemon.wire.tcp import ACK, PSH
from tests.test_splice_bounded import bounded
from tests.test_splice_relay import C_IRS, C_ISS, T0, from_client, of, spliced


class Recorder:
    """The daemon's and the fast path's side of the splicer, as one call log."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.refuse_installs = False
        self.bugs = 0  # the next installs that raise a non-OSError
        self.counters = {"internal_errors": 0}

    # the daemon
    def drain_tun(self) -> None:
        self.log.append(("drain",))

    def tun_write(self, vnet: Any, packet: Any) -> None:
        self.log.append(("write", bytes(packet)))

    # the fast path
    def install(self, key: Any, t: Any, ifindex: int, limit: Any, fin_ack: Any, *rest: Any) -> None:
        self.log.append(("install", key, fin_ack, limit))
        if self.refuse_installs:
            raise OSError(28, "No space left on device")
        if self.bugs:
            self.bugs -= 1
            raise AttributeError("a bug")

    def hold(self, key: Any, punt_ifindex: int) -> None:
        self.log.append(("hold", key, punt_ifindex))

    def remove(self, key: Any) -> tuple[int, int]:
        self.log.append(("remove", key))
        return 0, 0


def _splicer(punt_ifindex: int = 0) -> tuple[Splicer, Recorder, Splice, InstallFastPath]:
    bed, actions = bounded(300)
    (install,) = of(actions, InstallFastPath)
    assert isinstance(install, InstallFastPath)
    rec = Recorder()
    splicer = Splicer(rec, rec, lambda addr: 7)  # type: ignore[arg-type]
    sp = Splice(bed.relay, None, punt_ifindex=punt_ifindex)
    splicer.splices.add(sp)
    return splicer, rec, sp, install


def test_an_install_waits_for_the_end_of_the_pass_and_reads_the_tun_first() -> None:
    splicer, rec, sp, install = _splicer()
    splicer.execute(sp, [install])
    assert rec.log == []  # not in the middle of the pass that asked for it
    splicer.run_installs()
    assert [e[0] for e in rec.log] == ["drain", "install", "install"]
    assert [e[1] for e in rec.log[1:]] == [install.entries[0][0], install.entries[1][0]]
    assert sp.offloaded == [install.entries[0][0], install.entries[1][0]]
    rec.log.clear()
    splicer.run_installs()  # nothing left to do: no TUN read either
    assert rec.log == []


def test_a_watch_asked_for_after_the_install_goes_in_with_the_entry() -> None:
    splicer, rec, sp, install = _splicer()
    key = install.entries[0][0]
    splicer.execute(sp, [install, WatchFinAck(key, 12345)])
    splicer.run_installs()
    installed = {e[1]: e[2] for e in rec.log if e[0] == "install"}
    assert installed == {key: 12345, install.entries[1][0]: install.entries[1][2]}


def test_a_splice_torn_down_before_the_end_of_the_pass_is_never_installed() -> None:
    splicer, rec, sp, install = _splicer()
    splicer.execute(sp, [install, TearDown()])
    splicer.run_installs()
    assert not any(e[0] == "install" for e in rec.log)
    assert sp not in splicer.splices and splicer.installs == {}


def test_a_kernel_socket_splice_whose_install_fails_keeps_its_segments_coming() -> None:
    """A splice of two taken-over kernel connections (punt_ifindex set) whose install
    fails stays in the daemon: its 4-tuples are the host's own, so without an entry the
    kernel would answer their segments with RSTs; hold entries send them to the TUN
    instead, and go with the splice.  Any other splice just loses its entries."""
    splicer, rec, sp, install = _splicer(punt_ifindex=9)
    rec.refuse_installs = True
    splicer.execute(sp, [install])
    splicer.run_installs()
    keys = [install.entries[0][0], install.entries[1][0]]
    assert [e for e in rec.log if e[0] == "hold"] == [("hold", k, 9) for k in keys]
    assert sp.offloaded == [] and sp.held == keys
    assert not splicer.handed_over(sp)  # nothing in the kernel to adopt or sleep on
    rec.log.clear()
    splicer._offload_removed(sp)  # its tear-down
    assert rec.log == [("remove", k) for k in keys] and sp.held == []

    splicer, rec, sp, install = _splicer()
    rec.refuse_installs = True
    splicer.execute(sp, [install])
    splicer.run_installs()
    assert not any(e[0] == "hold" for e in rec.log) and sp.held == []


def test_the_clients_acks_wait_with_the_install_and_go_on_right_after_it() -> None:
    """While an install waits for the TUN to be read, the client's pure ACKs are held:
    relayed, each would let the server send more into the TUN, and a fast sender kept it
    from ever running dry (a download handed over mid-transfer crossed Python whole).
    They go on, in order, right after the install; anything else is relayed at once."""
    bed, actions = spliced()
    (install,) = of(actions, InstallFastPath)
    assert isinstance(install, InstallFastPath)
    rec = Recorder()
    splicer = Splicer(rec, rec, lambda addr: 7)  # type: ignore[arg-type]
    sp = Splice(bed.relay, None)
    splicer.splices.add(sp)
    splicer.execute(sp, [install])
    acks = [from_client(bed, seq=C_IRS + 1, ack=C_ISS + 1, window=w) for w in (600, 700)]
    for ack in acks:
        assert splicer.on_packet(sp, CLIENT, None, ack, T0)
    assert rec.log == [] and len(sp.acks_held) == 2
    data = from_client(bed, seq=C_IRS + 1, ack=C_ISS + 1, flags=ACK | PSH, payload=b"GET /")
    splicer.on_packet(sp, CLIENT, None, data, T0)
    assert [e[0] for e in rec.log] == ["write"]  # not held
    rec.log.clear()
    splicer.run_installs()
    assert [e[0] for e in rec.log] == ["drain", "install", "install", "write", "write"]
    windows = [int.from_bytes(e[1][34:36], "big") for e in rec.log[3:]]
    assert len(set(windows)) == 2 and windows == sorted(windows) and sp.acks_held == []


def test_a_bug_in_an_install_costs_that_splice_its_fast_path_not_the_daemon() -> None:
    """An exception other than the fast path's own errors (a daemon bug) is counted and
    logged; that splice stays on the Python path, the next in the same pass still goes in."""
    splicer, rec, sp, install = _splicer()
    bed, actions = spliced()
    (other_install,) = of(actions, InstallFastPath)
    assert isinstance(other_install, InstallFastPath)
    other = Splice(bed.relay, None)
    splicer.splices.add(other)
    rec.bugs = 1
    splicer.execute(sp, [install])
    splicer.execute(other, [other_install])
    splicer.run_installs()
    assert rec.counters["internal_errors"] == 1
    assert sp.offloaded == [] and sp in splicer.splices
    assert other.offloaded == [other_install.entries[0][0], other_install.entries[1][0]]
